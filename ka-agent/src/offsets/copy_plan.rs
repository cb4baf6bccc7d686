//! Groups the socket fields the programs read into a few spans, each copied
//! with one helper call (see [`SockCopyPlan`]).

use ka_common::{
    ABSENT, COMMON_SPANS, FULL_SPANS, NET_SPANS, SOCK_COPY_AREA, SPAN_BYTES, SockCopyPlan,
    SockOffsets, Span,
};

/// Where a field lives, which decides when the programs may read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// `sock_common`: every kind of socket has it.
    Common,
    /// The rest of a full socket (not a time-wait or request socket).
    Full,
    /// The socket's `struct net`.
    Net,
}

impl Group {
    const fn capacity(self) -> usize {
        match self {
            Self::Common => COMMON_SPANS,
            Self::Full => FULL_SPANS,
            Self::Net => NET_SPANS,
        }
    }
}

/// One field the programs read: its name, group, size in bytes (the type
/// `ka-ebpf/src/sock.rs` reads it as), offset in the structure, and its
/// position in the copy to fill in.
struct Field<'a> {
    name: &'static str,
    group: Group,
    size: u16,
    offset: u16,
    position: &'a mut u16,
}

/// Every field the programs read from the copy, with `at` as where its
/// position goes.
fn fields<'a>(offsets: &SockOffsets, at: &'a mut SockOffsets) -> [Field<'a>; 30] {
    let SockOffsets {
        skc_family,
        skc_state,
        skc_num,
        skc_dport,
        skc_rcv_saddr,
        skc_daddr,
        skc_v6_rcv_saddr,
        skc_v6_daddr,
        skc_net,
        skc_cookie,
        sk_flags,
        sk_err,
        sk_err_soft,
        // Read directly: the timer hooks turn it into the socket pointer.
        keepalive_timer: _,
        icsk_probes_out,
        icsk_retransmits,
        icsk_user_timeout,
        icsk_ack_lrcvtime,
        tp_keepalive_time,
        tp_keepalive_intvl,
        tp_keepalive_probes,
        tp_rcv_tstamp,
        tp_lsndtime,
        tp_packets_out,
        tp_total_retrans,
        net_ns_inum,
        net_keepalive_time,
        net_keepalive_intvl,
        net_keepalive_probes,
        // Read directly, only for resets sent without a socket.
        skb_dev: _,
        dev_nd_net: _,
        sock_keepopen_bit: _,
        sk_protocol,
        // Read directly, by the raw timer programs' filter.
        timer_function: _,
        inet_sport,
        // Read directly, only at a close the kernel made on an error.
        sk_socket: _,
        socket_ino: _,
    } = *offsets;
    macro_rules! fields {
        ($($group:ident $size:literal $name:ident),* $(,)?) => {
            [$(Field {
                name: stringify!($name),
                group: Group::$group,
                size: $size,
                offset: $name,
                position: &mut at.$name,
            }),*]
        };
    }
    fields![
        Common 2 skc_family,
        Common 1 skc_state,
        Common 2 skc_num,
        Common 2 skc_dport,
        Common 4 skc_rcv_saddr,
        Common 4 skc_daddr,
        Common 16 skc_v6_rcv_saddr,
        Common 16 skc_v6_daddr,
        Common 8 skc_net,
        Common 8 skc_cookie,
        Full 8 sk_flags,
        Full 4 sk_err,
        Full 4 sk_err_soft,
        Full 1 icsk_probes_out,
        Full 1 icsk_retransmits,
        Full 4 icsk_user_timeout,
        Full 4 icsk_ack_lrcvtime,
        Full 4 tp_keepalive_time,
        Full 4 tp_keepalive_intvl,
        Full 1 tp_keepalive_probes,
        Full 4 tp_rcv_tstamp,
        Full 4 tp_lsndtime,
        Full 4 tp_packets_out,
        Full 4 tp_total_retrans,
        Full 2 sk_protocol,
        Full 2 inet_sport,
        Net 4 net_ns_inum,
        Net 4 net_keepalive_time,
        Net 4 net_keepalive_intvl,
        Net 1 net_keepalive_probes,
    ]
}

/// The plan for `offsets`, and the names of fields that did not fit in the
/// spans the programs copy (left [`ABSENT`]: read as zero, like a field this
/// kernel lacks).
pub fn plan(offsets: &SockOffsets) -> (SockCopyPlan, Vec<&'static str>) {
    let mut plan = SockCopyPlan::ABSENT;
    let mut fields = fields(offsets, &mut plan.at);
    fields.sort_by_key(|f| f.offset);
    let mut unplaced = Vec::new();
    // Where the next span lands in the copy: spans are packed in order.
    let mut to: u16 = 0;
    for (group, spans) in [
        (Group::Common, &mut plan.common[..]),
        (Group::Full, &mut plan.full[..]),
        (Group::Net, &mut plan.net[..]),
    ] {
        // Each field in the last span if it still fits there, else in a new
        // span starting at it (8-byte aligned, which keeps every field as
        // aligned in the copy as in the socket).
        let mut span_of = Vec::new();
        let mut used = 0;
        for (index, field) in fields.iter().enumerate() {
            if field.group != group || field.offset == ABSENT {
                continue;
            }
            let end = field.offset + field.size;
            let fits_last = used > 0 && end - spans[used - 1].offset <= SPAN_BYTES;
            if !fits_last {
                if used == group.capacity() {
                    unplaced.push(field.name);
                    continue;
                }
                spans[used].offset = field.offset & !7;
                used += 1;
            }
            let span = &mut spans[used - 1];
            span.len = span.len.max(end - span.offset);
            span_of.push((index, used - 1));
        }
        // Pack the spans; one that no longer fits the copy is dropped with
        // its fields.
        let mut packed = vec![true; used];
        for (span, fits) in spans.iter_mut().take(used).zip(&mut packed) {
            if to + span.len > SOCK_COPY_AREA {
                *fits = false;
                *span = Span::default();
                continue;
            }
            span.to = to;
            to = (to + span.len).next_multiple_of(8);
        }
        // A dropped span would end the programs' copying early: close gaps.
        let kept: Vec<Span> = spans.iter().copied().filter(|s| s.len > 0).collect();
        for (index, span_index) in span_of {
            let field = &mut fields[index];
            if !packed[span_index] {
                unplaced.push(field.name);
                continue;
            }
            let span = spans[span_index];
            *field.position = span.to + (field.offset - span.offset);
        }
        for (slot, span) in spans.iter_mut().enumerate() {
            *span = kept.get(slot).copied().unwrap_or_default();
        }
    }
    // Not a position: the snapshot tests this bit of `sk_flags` in the copy,
    // and carrying it here spares the program a second table.
    plan.at.sock_keepopen_bit = offsets.sock_keepopen_bit;
    (plan, unplaced)
}

#[cfg(test)]
mod tests {
    use ka_common::{SOCK_COPY_BYTES, SOCK_COPY_MASK};

    use super::*;

    /// Does in memory what the programs do: copies the spans of `sock` and
    /// `net` into a buffer like the per-CPU copy.
    fn copy(plan: &SockCopyPlan, sock: &[u8], net: &[u8]) -> Vec<u8> {
        let mut copy = vec![0u8; SOCK_COPY_BYTES];
        let groups = [
            (&plan.common[..], sock),
            (&plan.full[..], sock),
            (&plan.net[..], net),
        ];
        for (spans, source) in groups {
            for span in spans {
                let (from, len) = (usize::from(span.offset), usize::from(span.len));
                let to = usize::from(span.to & SOCK_COPY_MASK);
                copy[to..to + len].copy_from_slice(&source[from..from + len]);
            }
        }
        copy
    }

    /// Every placed field reads the same bytes from the copy as from the
    /// structure itself, at a position the programs' mask keeps in bounds.
    fn assert_faithful(offsets: &SockOffsets) {
        let (plan, unplaced) = plan(offsets);
        assert!(unplaced.is_empty(), "fields left out: {unplaced:?}");
        let sock: Vec<u8> = (0..4096u32)
            .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
            .collect();
        let net: Vec<u8> = (0..8192u32)
            .map(|i| (i * 13 + 5 + i / 241).to_le_bytes()[0])
            .collect();
        let copied = copy(&plan, &sock, &net);
        let mut at = plan.at;
        let mut checked = 0;
        for field in fields(offsets, &mut at) {
            let name = field.name;
            let position = *field.position;
            if field.offset == ABSENT {
                assert_eq!(position, ABSENT, "{name}");
                continue;
            }
            let source = if field.group == Group::Net {
                &net
            } else {
                &sock
            };
            let (p, o, n) = (
                usize::from(position),
                usize::from(field.offset),
                usize::from(field.size),
            );
            assert_eq!(
                position & SOCK_COPY_MASK,
                position,
                "{name} beyond the mask"
            );
            assert_eq!(p % n.min(8), o % n.min(8), "{name} alignment changed");
            assert_eq!(copied[p..p + n], source[o..o + n], "{name}");
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} fields checked");
        for span in plan.common.iter().chain(&plan.full).chain(&plan.net) {
            assert!(span.len <= SPAN_BYTES);
            assert!(span.to.is_multiple_of(8) && span.to + span.len <= SOCK_COPY_AREA);
        }
    }

    #[test]
    fn the_6_19_fixture_fits_and_reads_back() {
        let btf = crate::offsets::btf::KernelBtf::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/btf/sock-6.19.btf"),
        )
        .expect("fixture parses");
        let offsets = crate::offsets::btf::sock_offsets(&btf, &mut Vec::new()).expect("offsets");
        assert_faithful(&offsets);
    }

    #[test]
    fn the_live_kernel_fits_and_reads_back() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "BTF must exist in CI"
            );
            eprintln!("SKIPPED: no live BTF at {}", path.display());
            return;
        }
        let btf = crate::offsets::btf::KernelBtf::from_file(path).expect("live BTF parses");
        let offsets = crate::offsets::btf::sock_offsets(&btf, &mut Vec::new()).expect("offsets");
        let (plan, _) = plan(&offsets);
        assert_eq!(plan.at.sock_keepopen_bit, offsets.sock_keepopen_bit);
        // sock_common's fields share one span on every kernel we know.
        assert_eq!(plan.common[1].len, 0, "{plan:?}");
        assert_faithful(&offsets);
    }

    #[test]
    fn scattered_fields_beyond_the_spans_are_left_out_not_misplaced() {
        let mut offsets = SockOffsets::ABSENT;
        offsets.skc_family = 16;
        // Ten full-socket fields each 600 bytes apart need ten spans; the
        // programs copy eight.
        let mut next = 300;
        for f in [
            &mut offsets.sk_flags,
            &mut offsets.sk_err,
            &mut offsets.icsk_probes_out,
            &mut offsets.icsk_retransmits,
            &mut offsets.icsk_user_timeout,
            &mut offsets.icsk_ack_lrcvtime,
            &mut offsets.tp_keepalive_time,
            &mut offsets.tp_keepalive_intvl,
            &mut offsets.tp_keepalive_probes,
            &mut offsets.tp_rcv_tstamp,
        ] {
            *f = next;
            next += 600;
        }
        let (plan, unplaced) = plan(&offsets);
        assert_eq!(unplaced, vec!["tp_keepalive_probes", "tp_rcv_tstamp"]);
        assert_eq!(plan.at.tp_rcv_tstamp, ABSENT);
        // Spans start at their first field (8-byte aligned) and are packed
        // in order: sock_common's 2 bytes at 0, then 8-byte steps.
        assert_eq!(plan.at.skc_family, 0);
        assert_eq!(
            plan.full[0],
            Span {
                offset: 296,
                len: 12,
                to: 8
            }
        );
        assert_eq!(plan.at.sk_flags, 8 + 4);
        assert_eq!(plan.full[FULL_SPANS - 1].offset, 300 + 7 * 600 - 4);
    }

    #[test]
    fn spans_beyond_the_copy_are_left_out_not_misplaced() {
        let mut offsets = SockOffsets::ABSENT;
        offsets.skc_family = 16;
        // Five spans of 504 bytes (two fields 500 apart each): four fit the
        // 2048-byte copy after sock_common's.
        let pairs = [
            (&mut offsets.sk_flags, &mut offsets.sk_err),
            (&mut offsets.icsk_probes_out, &mut offsets.icsk_user_timeout),
            (
                &mut offsets.icsk_ack_lrcvtime,
                &mut offsets.tp_keepalive_time,
            ),
            (&mut offsets.tp_keepalive_intvl, &mut offsets.tp_rcv_tstamp),
            (&mut offsets.tp_lsndtime, &mut offsets.tp_packets_out),
        ];
        for (index, (first, second)) in pairs.into_iter().enumerate() {
            let start = 1000 + 1000 * u16::try_from(index).unwrap();
            (*first, *second) = (start, start + 500);
        }
        let (plan, unplaced) = plan(&offsets);
        assert_eq!(unplaced, vec!["tp_lsndtime", "tp_packets_out"]);
        assert_eq!(plan.full[4], Span::default());
        let last = plan.full[3];
        assert!(last.to + last.len <= SOCK_COPY_AREA, "{plan:?}");
        assert_eq!(plan.at.tp_rcv_tstamp, last.to + 500);
    }
}
