//! Tracepoint record layouts from tracefs `format` files.
//!
//! A `format` file looks like this (one field per line; tabs shown as
//! spaces):
//!
//! ```text
//! name: tcp_send_reset
//! ID: 2280
//! format:
//!     field:unsigned short common_type; offset:0; size:2; signed:0;
//!     ...
//!     field:const void * skaddr; offset:16; size:8; signed:0;
//!     field:__u8 saddr[28]; offset:32; size:28; signed:0;
//!
//! print fmt: "skbaddr=%p ...", REC->skbaddr, ...
//! ```
//!
//! The record offsets go to the kernel programs through the `ka-common`
//! `*Fields` tables; a field a kernel lacks is [`ABSENT`].

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ka_common::{
    ABSENT, ErrorReportFields, RetransmitFields, SendResetFields, SetStateFields, SkRecordFields,
    TimerFields,
};

/// Why a format file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: cannot parse {problem}: {text:?}")]
    Parse {
        path: PathBuf,
        line: usize,
        problem: &'static str,
        text: String,
    },
    #[error("{path}: field {field} at offset {offset} does not fit the u16 offset table")]
    OffsetTooLarge {
        path: PathBuf,
        field: String,
        offset: usize,
    },
    #[error("{path}: field {field} is {size} bytes, its program reads {read}")]
    FieldWidth {
        path: PathBuf,
        field: String,
        size: usize,
        read: usize,
    },
    #[error("tracepoint {tracepoint} lacks field {field}, which its program needs ({path})")]
    MissingField {
        path: PathBuf,
        tracepoint: String,
        field: &'static str,
    },
}

impl TracefsError {
    /// A record this kernel lays out otherwise than its program reads it:
    /// that hook degrades, the rest of the agent runs.
    pub fn leaves_hook_unavailable(&self) -> bool {
        matches!(self, Self::MissingField { .. } | Self::FieldWidth { .. })
    }
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The C type as tracefs spells it, without the array suffix
    /// (`const void *`, `__u8`, `enum sk_rst_reason`).
    pub c_type: String,
    /// `Some(n)` for `__u8 saddr[n]`.
    pub array_len: Option<usize>,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A parsed `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    /// Where it was read from (named in errors).
    pub path: PathBuf,
    pub name: String,
    /// The event id (`ID:` line), which `perf_event_open` takes.
    pub id: Option<u32>,
    pub fields: Vec<Field>,
    pub print_fmt: String,
}

impl TracepointFormat {
    /// Reads `<tracefs>/events/<category>/<name>/format`; `Ok(None)` when the
    /// tracepoint does not exist on this kernel.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Option<Self>, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read(&path) {
            Ok(bytes) => Self::parse(&path, &String::from_utf8_lossy(&bytes)).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TracefsError::Read { path, source }),
        }
    }

    /// Parses the text of a format file; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TracefsError> {
        let error = |line: usize, problem: &'static str, text: &str| TracefsError::Parse {
            path: path.to_owned(),
            line,
            problem,
            text: text.chars().take(120).collect(),
        };
        let mut name = None;
        let mut id = None;
        let mut fields = Vec::new();
        let mut print_fmt = String::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed == "format:" {
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("name:") {
                let rest = rest.trim();
                if rest.is_empty() {
                    return Err(error(number, "empty name", trimmed));
                }
                name = Some(rest.to_owned());
            } else if let Some(rest) = trimmed.strip_prefix("ID:") {
                id = Some(
                    rest.trim()
                        .parse()
                        .map_err(|_| error(number, "event id", trimmed))?,
                );
            } else if let Some(rest) = trimmed.strip_prefix("print fmt:") {
                rest.trim().clone_into(&mut print_fmt);
            } else if trimmed.starts_with("field:") {
                fields.push(parse_field(trimmed).ok_or_else(|| error(number, "field", trimmed))?);
            } else {
                return Err(error(number, "unexpected line", trimmed));
            }
        }
        let Some(name) = name else {
            let first = text.lines().next().unwrap_or_default();
            return Err(error(1, "format file without a name: line", first));
        };
        if fields.is_empty() {
            return Err(error(
                text.lines().count(),
                "format file without fields",
                "",
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            name,
            id,
            fields,
            print_fmt,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of an optional field its program reads as a `T`, [`ABSENT`]
    /// when the kernel lacks it.
    ///
    /// The field must be exactly `T`'s width: a program's read then stays
    /// inside what the kernel wrote into its trace buffer, so it cannot
    /// fail or pick up a neighbour's bytes (a failed read would be an event
    /// dropped without a count).
    fn optional<T>(&self, name: &str) -> Result<u16, TracefsError> {
        let Some(field) = self.field(name) else {
            return Ok(ABSENT);
        };
        if field.size != size_of::<T>() {
            return Err(TracefsError::FieldWidth {
                path: self.path.clone(),
                field: name.to_owned(),
                size: field.size,
                read: size_of::<T>(),
            });
        }
        // ABSENT itself is not a usable offset: it would read as "missing".
        u16::try_from(field.offset)
            .ok()
            .filter(|offset| *offset != ABSENT)
            .ok_or_else(|| TracefsError::OffsetTooLarge {
                path: self.path.clone(),
                field: name.to_owned(),
                offset: field.offset,
            })
    }

    /// Offset of a field the hook's program cannot do without, read as a
    /// `T` (see [`Self::optional`]).
    fn required<T>(&self, name: &'static str) -> Result<u16, TracefsError> {
        let offset = self.optional::<T>(name)?;
        if offset == ABSENT {
            return Err(TracefsError::MissingField {
                path: self.path.clone(),
                tracepoint: self.name.clone(),
                field: name,
            });
        }
        Ok(offset)
    }

    /// `sock:inet_sock_set_state`.
    pub fn set_state(&self) -> Result<SetStateFields, TracefsError> {
        Ok(SetStateFields {
            skaddr: self.required::<u64>("skaddr")?,
            oldstate: self.required::<i32>("oldstate")?,
            newstate: self.required::<i32>("newstate")?,
            protocol: self.required::<u16>("protocol")?,
        })
    }

    /// `tcp:tcp_retransmit_skb` (`err` from 6.17).
    pub fn retransmit(&self) -> Result<RetransmitFields, TracefsError> {
        Ok(RetransmitFields {
            skaddr: self.required::<u64>("skaddr")?,
            skbaddr: self.optional::<u64>("skbaddr")?,
            err: self.optional::<i32>("err")?,
            reserved: 0,
        })
    }

    /// `tcp:tcp_send_reset` (`reason` from 6.10; before that the record has
    /// sport/dport/family, which ka does not need).
    pub fn send_reset(&self) -> Result<SendResetFields, TracefsError> {
        Ok(SendResetFields {
            skaddr: self.required::<u64>("skaddr")?,
            skbaddr: self.required::<u64>("skbaddr")?,
            reason: self.optional::<u32>("reason")?,
            state: self.optional::<i32>("state")?,
        })
    }

    /// `tcp:tcp_receive_reset` and `tcp:tcp_destroy_sock`.
    pub fn sk_record(&self) -> Result<SkRecordFields, TracefsError> {
        Ok(SkRecordFields {
            skaddr: self.required::<u64>("skaddr")?,
            reserved: [0; 3],
        })
    }

    /// `sock:inet_sk_error_report`.
    pub fn error_report(&self) -> Result<ErrorReportFields, TracefsError> {
        Ok(ErrorReportFields {
            error: self.required::<i32>("error")?,
            protocol: self.optional::<u16>("protocol")?,
            family: self.required::<u16>("family")?,
            sport: self.required::<u16>("sport")?,
            dport: self.required::<u16>("dport")?,
            saddr: self.optional::<u32>("saddr")?,
            daddr: self.optional::<u32>("daddr")?,
            saddr_v6: self.optional::<[u8; 16]>("saddr_v6")?,
            daddr_v6: self.optional::<[u8; 16]>("daddr_v6")?,
            reserved: [0; 3],
        })
    }

    /// `timer:timer_start` (needs `expires`).
    pub fn timer_start(&self) -> Result<TimerFields, TracefsError> {
        Ok(TimerFields {
            expires: self.required::<u64>("expires")?,
            ..self.timer()?
        })
    }

    /// `timer:timer_expire_entry` (and the common part of `timer_start`).
    pub fn timer(&self) -> Result<TimerFields, TracefsError> {
        Ok(TimerFields {
            timer: self.required::<u64>("timer")?,
            function: self.required::<u64>("function")?,
            expires: self.optional::<u64>("expires")?,
            reserved: 0,
        })
    }

    /// The numeric cases of `__print_symbolic(REC-><field>, { 1, "NAME" }, ...)`
    /// in the print format (how tracefs itself names enum values such as the
    /// reset reason). Symbolic cases (`{ TCP_CLOSE, "TCP_CLOSE" }`) are
    /// skipped: their values are not in the file.
    pub fn symbolic_values(&self, field: &str) -> BTreeMap<u64, String> {
        let marker = format!("__print_symbolic(REC->{field},");
        let mut values = BTreeMap::new();
        let Some(start) = self.print_fmt.find(&marker) else {
            return values;
        };
        let mut rest = &self.print_fmt[start + marker.len()..];
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            let Some(case) = rest.strip_prefix('{') else {
                break;
            };
            let Some((body, after)) = case.split_once('}') else {
                break;
            };
            rest = after;
            let Some((value, name)) = body.split_once(',') else {
                break;
            };
            let value = value.trim();
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => value.parse().ok(),
            };
            if let Some(number) = parsed {
                values.insert(number, name.trim().trim_matches('"').to_owned());
            }
        }
        values
    }
}

/// `field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;`
fn parse_field(line: &str) -> Option<Field> {
    let mut declaration = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':')?;
        let value = value.trim();
        match key.trim() {
            "field" => declaration = Some(value),
            "offset" => offset = Some(value.parse().ok()?),
            "size" => size = Some(value.parse().ok()?),
            "signed" => {
                signed = match value {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                };
            }
            // Newer kernels may add keys; they do not change the layout.
            _ => {}
        }
    }
    let (c_type, name, array_len) = split_declaration(declaration?)?;
    Some(Field {
        name,
        c_type,
        array_len,
        offset: offset?,
        size: size?,
        signed,
    })
}

/// `__u8 saddr[4]` → (`__u8`, `saddr`, `Some(4)`). The name is the last
/// identifier; only a trailing `[n]` is an array suffix, so that
/// `__data_loc char[] name` keeps `char[]` in its type.
fn split_declaration(declaration: &str) -> Option<(String, String, Option<usize>)> {
    let (base, array_len) = match declaration.strip_suffix(']') {
        Some(open) => {
            let (base, length) = open.rsplit_once('[')?;
            (base.trim_end(), Some(length.trim().parse().ok()?))
        }
        None => (declaration, None),
    };
    let name_start = base
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let (c_type, name) = base.split_at(name_start);
    let c_type = c_type.trim();
    if name.is_empty() || c_type.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some((c_type.to_owned(), name.to_owned(), array_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tracefs")
    }

    fn fixture(kernel: &str, category: &str, name: &str) -> TracepointFormat {
        TracepointFormat::read(&fixtures().join(kernel), category, name)
            .expect("fixture parses")
            .expect("fixture exists")
    }

    #[test]
    fn parses_fields_of_every_shape() {
        let format = fixture("6.18", "tcp", "tcp_send_reset");
        assert_eq!(format.name, "tcp_send_reset");
        assert_eq!(format.id, Some(2280));
        assert_eq!(
            format.field("skaddr"),
            Some(&Field {
                name: "skaddr".into(),
                c_type: "const void *".into(),
                array_len: None,
                offset: 16,
                size: 8,
                signed: false,
            })
        );
        let reason = format.field("reason").expect("6.18 has reason");
        assert_eq!(
            (reason.c_type.as_str(), reason.offset, reason.size),
            ("enum sk_rst_reason", 28, 4)
        );
        let saddr = format.field("saddr").expect("saddr");
        assert_eq!(
            (saddr.c_type.as_str(), saddr.array_len, saddr.size),
            ("__u8", Some(28), 28)
        );
        let pid = format.field("common_pid").expect("common field");
        assert!(pid.signed);
        assert!(format.print_fmt.starts_with("\"skbaddr=%p"));
        assert_eq!(
            split_declaration("__data_loc char[] name"),
            Some(("__data_loc char[]".into(), "name".into(), None))
        );
    }

    #[test]
    fn fills_the_6_18_tables() {
        assert_eq!(
            fixture("6.18", "sock", "inet_sock_set_state")
                .set_state()
                .unwrap(),
            SetStateFields {
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                protocol: 30
            }
        );
        assert_eq!(
            fixture("6.18", "tcp", "tcp_send_reset")
                .send_reset()
                .unwrap(),
            SendResetFields {
                skaddr: 16,
                skbaddr: 8,
                reason: 28,
                state: 24
            }
        );
        assert_eq!(
            fixture("6.18", "tcp", "tcp_retransmit_skb")
                .retransmit()
                .unwrap(),
            RetransmitFields {
                skaddr: 16,
                skbaddr: 8,
                err: 76,
                reserved: 0
            }
        );
        for name in ["tcp_receive_reset", "tcp_destroy_sock"] {
            assert_eq!(fixture("6.18", "tcp", name).sk_record().unwrap().skaddr, 8);
        }
        let error = fixture("6.18", "sock", "inet_sk_error_report")
            .error_report()
            .unwrap();
        assert_eq!(
            (error.error, error.family, error.sport, error.dport),
            (8, 16, 12, 14)
        );
        assert_eq!(
            fixture("6.18", "timer", "timer_start")
                .timer_start()
                .unwrap(),
            TimerFields {
                timer: 8,
                function: 16,
                expires: 24,
                reserved: 0
            }
        );
        assert_eq!(
            fixture("6.18", "timer", "timer_expire_entry")
                .timer()
                .unwrap(),
            TimerFields {
                timer: 8,
                function: 24,
                expires: ABSENT,
                reserved: 0
            }
        );
    }

    #[test]
    fn fills_the_6_1_tables_without_reason_or_err() {
        // v6.1 include/trace/events/tcp.h: tcp_send_reset and
        // tcp_retransmit_skb share the tcp_event_sk_skb class (skbaddr,
        // skaddr, state, sport, dport, family, addresses); `reason` arrived
        // in 6.10 and `err` in 6.17.
        let reset = fixture("6.1", "tcp", "tcp_send_reset");
        assert!(reset.field("sport").is_some() && reset.field("family").is_some());
        assert_eq!(
            reset.send_reset().unwrap(),
            SendResetFields {
                skaddr: 16,
                skbaddr: 8,
                reason: ABSENT,
                state: 24
            }
        );
        assert!(reset.symbolic_values("reason").is_empty());
        assert_eq!(
            fixture("6.1", "tcp", "tcp_retransmit_skb")
                .retransmit()
                .unwrap(),
            RetransmitFields {
                skaddr: 16,
                skbaddr: 8,
                err: ABSENT,
                reserved: 0
            }
        );
    }

    #[test]
    fn reset_reasons_from_the_print_format() {
        let reasons = fixture("6.18", "tcp", "tcp_send_reset").symbolic_values("reason");
        assert_eq!(
            reasons.get(&15).map(String::as_str),
            Some("TCP_KEEPALIVE_TIMEOUT")
        );
        assert_eq!(reasons.get(&1).map(String::as_str), Some("NO_SOCKET"));
        // `state` is printed with symbolic constants only: nothing to learn.
        assert!(
            fixture("6.18", "tcp", "tcp_send_reset")
                .symbolic_values("state")
                .is_empty()
        );
    }

    #[test]
    fn malformed_fixtures_are_errors_naming_file_and_line() {
        let root = fixtures().join("malformed");
        let cases = [
            ("bad_offset", 6, "field"),
            ("garbage", 1, "unexpected line"),
            ("bad_id", 2, "event id"),
            ("no_name", 1, "format file without a name"),
        ];
        for (name, line, problem) in cases {
            let error = TracepointFormat::read(&root, "ka", name).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(&error, TracefsError::Parse { line: l, .. } if *l == line),
                "{name}: {message}"
            );
            assert!(
                message.contains(&format!("{name}/format:{line}: cannot parse {problem}")),
                "{message}"
            );
        }
    }

    #[test]
    fn missing_required_field_makes_the_hook_unusable() {
        let format = fixture("malformed", "ka", "no_skaddr");
        let error = format.set_state().unwrap_err();
        assert!(matches!(
            error,
            TracefsError::MissingField {
                field: "skaddr",
                ..
            }
        ));
        assert!(
            error
                .to_string()
                .contains("tracepoint inet_sock_set_state lacks field skaddr"),
            "{error}"
        );
        assert!(matches!(
            fixture("malformed", "ka", "huge_offset").set_state(),
            Err(TracefsError::OffsetTooLarge { .. })
        ));
        assert!(
            TracepointFormat::read(&fixtures().join("6.1"), "tcp", "no_such_tracepoint")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_field_of_another_width_than_its_program_reads_makes_the_hook_unusable() {
        // `protocol` as an `int`: read as the program's two bytes, it would
        // be half a field; the hook degrades instead.
        let error = fixture("malformed", "ka", "wide_protocol")
            .set_state()
            .unwrap_err();
        assert!(
            matches!(
                &error,
                TracefsError::FieldWidth { field, size: 4, read: 2, .. } if field == "protocol"
            ),
            "{error:?}"
        );
        assert!(error.leaves_hook_unavailable());
        assert!(
            error
                .to_string()
                .ends_with("wide_protocol/format: field protocol is 4 bytes, its program reads 2"),
            "{error}"
        );
        let missing = fixture("malformed", "ka", "no_skaddr")
            .set_state()
            .unwrap_err();
        assert!(missing.leaves_hook_unavailable());
        let garbage = fixture("malformed", "ka", "huge_offset")
            .set_state()
            .unwrap_err();
        assert!(!garbage.leaves_hook_unavailable());
    }

    #[test]
    fn garbage_never_panics() {
        let path = Path::new("fuzz/format");
        for text in [
            "",
            "\u{0}\u{1}",
            "name: x\nformat:\n\tfield:int; offset:zz; size:4;\n",
            "name: x\n\tfield:;offset:1;size:1;\n",
            "name: x\n\tfield:int a[;offset:1;size:1;\n",
            "name: x\n\tfield:int a[99999999999999999999];offset:1;size:1;\n",
            "name: x\n\tfield:int a;offset:-1;size:1;\n",
            "name: x\n\tfield:int a;offset:1;size:1;signed:2;\n",
            "name: x\n\tfield:int a;offset:1;size:1;\nprint fmt: __print_symbolic(REC->a, { 1",
        ] {
            let result = TracepointFormat::parse(path, text);
            if let Ok(format) = result {
                let _ = format.symbolic_values("a");
            }
        }
    }

    fn live_tracefs() -> Option<PathBuf> {
        let tracefs = Path::new("/sys/kernel/tracing");
        if tracefs
            .join("events/sock/inet_sock_set_state/format")
            .exists()
        {
            return Some(tracefs.to_owned());
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "live tracefs must be readable in CI"
        );
        eprintln!("SKIPPED: live tracefs not mounted or not readable (run as root)");
        None
    }

    #[test]
    fn live_kernel_formats() {
        let Some(tracefs) = live_tracefs() else {
            return;
        };
        let read = |category: &str, name: &str| {
            TracepointFormat::read(&tracefs, category, name)
                .expect("live format parses")
                .expect("tracepoint exists")
        };
        read("sock", "inet_sock_set_state").set_state().unwrap();
        read("tcp", "tcp_receive_reset").sk_record().unwrap();
        read("tcp", "tcp_destroy_sock").sk_record().unwrap();
        read("tcp", "tcp_retransmit_skb").retransmit().unwrap();
        read("sock", "inet_sk_error_report").error_report().unwrap();
        read("timer", "timer_start").timer_start().unwrap();
        read("timer", "timer_expire_entry").timer().unwrap();
        let reset = read("tcp", "tcp_send_reset");
        let fields = reset.send_reset().unwrap();
        if fields.reason != ABSENT {
            assert_eq!(
                reset.symbolic_values("reason").get(&15).map(String::as_str),
                Some("TCP_KEEPALIVE_TIMEOUT")
            );
        }
    }
}
