//! Tracepoint record layouts from tracefs `format` files.

use std::path::{Path, PathBuf};

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
    #[error("{path}:{line}: cannot parse field line {text:?}")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{path}: field {field} at offset {offset} does not fit the offset table")]
    OffsetTooLarge {
        path: PathBuf,
        field: String,
        offset: usize,
    },
    #[error("{path}: required field {field} missing")]
    MissingField { path: PathBuf, field: &'static str },
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub c_type: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A parsed `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    pub path: PathBuf,
    pub name: String,
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
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TracefsError::Read { path, source }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, TracefsError> {
        let mut name = String::new();
        let mut fields = Vec::new();
        let mut print_fmt = String::new();
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if let Some(rest) = trimmed.strip_prefix("name:") {
                rest.trim().clone_into(&mut name);
            } else if let Some(rest) = trimmed.strip_prefix("print fmt:") {
                rest.trim().clone_into(&mut print_fmt);
            } else if trimmed.starts_with("field:") {
                let parse_error = || TracefsError::Parse {
                    path: path.to_owned(),
                    line: index + 1,
                    text: trimmed.to_owned(),
                };
                fields.push(parse_field(trimmed).ok_or_else(parse_error)?);
            }
        }
        if name.is_empty() && fields.is_empty() {
            return Err(TracefsError::Parse {
                path: path.to_owned(),
                line: 1,
                text: text.lines().next().unwrap_or_default().to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            name,
            fields,
            print_fmt,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of an optional field, [`ABSENT`] when missing.
    fn optional(&self, name: &str) -> Result<u16, TracefsError> {
        match self.field(name) {
            None => Ok(ABSENT),
            Some(field) => u16::try_from(field.offset)
                .ok()
                .filter(|o| *o != ABSENT)
                .ok_or_else(|| TracefsError::OffsetTooLarge {
                    path: self.path.clone(),
                    field: name.to_owned(),
                    offset: field.offset,
                }),
        }
    }

    fn required(&self, name: &'static str) -> Result<u16, TracefsError> {
        let offset = self.optional(name)?;
        if offset == ABSENT {
            return Err(TracefsError::MissingField {
                path: self.path.clone(),
                field: name,
            });
        }
        Ok(offset)
    }

    pub fn set_state(&self) -> Result<SetStateFields, TracefsError> {
        Ok(SetStateFields {
            skaddr: self.required("skaddr")?,
            oldstate: self.required("oldstate")?,
            newstate: self.required("newstate")?,
            protocol: self.required("protocol")?,
        })
    }

    pub fn retransmit(&self) -> Result<RetransmitFields, TracefsError> {
        Ok(RetransmitFields {
            skaddr: self.required("skaddr")?,
            skbaddr: self.optional("skbaddr")?,
            err: self.optional("err")?,
            reserved: 0,
        })
    }

    pub fn send_reset(&self) -> Result<SendResetFields, TracefsError> {
        Ok(SendResetFields {
            skaddr: self.required("skaddr")?,
            skbaddr: self.optional("skbaddr")?,
            reason: self.optional("reason")?,
            state: self.optional("state")?,
        })
    }

    pub fn sk_record(&self) -> Result<SkRecordFields, TracefsError> {
        Ok(SkRecordFields {
            skaddr: self.required("skaddr")?,
            reserved: [0; 3],
        })
    }

    pub fn error_report(&self) -> Result<ErrorReportFields, TracefsError> {
        Ok(ErrorReportFields {
            error: self.required("error")?,
            protocol: self.optional("protocol")?,
            family: self.required("family")?,
            sport: self.required("sport")?,
            dport: self.required("dport")?,
            saddr: self.optional("saddr")?,
            daddr: self.optional("daddr")?,
            saddr_v6: self.optional("saddr_v6")?,
            daddr_v6: self.optional("daddr_v6")?,
            reserved: [0; 3],
        })
    }

    pub fn timer(&self) -> Result<TimerFields, TracefsError> {
        Ok(TimerFields {
            timer: self.required("timer")?,
            function: self.required("function")?,
            expires: self.optional("expires")?,
            reserved: 0,
        })
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
        match key.trim() {
            "field" => declaration = Some(value.trim()),
            "offset" => offset = value.trim().parse().ok(),
            "size" => size = value.trim().parse().ok(),
            "signed" => signed = value.trim() == "1",
            _ => {}
        }
    }
    let declaration = declaration?;
    // The name is the last identifier, before any array suffix.
    let without_array = declaration.split('[').next()?.trim_end();
    let name_start = without_array
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let name = &without_array[name_start..];
    if name.is_empty() {
        return None;
    }
    Some(Field {
        name: name.to_owned(),
        c_type: without_array[..name_start].trim().to_owned(),
        offset: offset?,
        size: size?,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(kernel: &str, category: &str, name: &str) -> TracepointFormat {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tracefs")
            .join(kernel);
        TracepointFormat::read(&root, category, name)
            .expect("parse")
            .expect("fixture exists")
    }

    #[test]
    fn parses_6_18_formats() {
        let set_state = fixture("6.18", "sock", "inet_sock_set_state")
            .set_state()
            .unwrap();
        assert_eq!(
            set_state,
            SetStateFields {
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                protocol: 30
            }
        );
        let reset = fixture("6.18", "tcp", "tcp_send_reset")
            .send_reset()
            .unwrap();
        assert_eq!((reset.skaddr, reset.reason, reset.state), (16, 28, 24));
        let retransmit = fixture("6.18", "tcp", "tcp_retransmit_skb")
            .retransmit()
            .unwrap();
        assert_eq!(retransmit.err, 76);
        let timer = fixture("6.18", "timer", "timer_start").timer().unwrap();
        assert_eq!((timer.timer, timer.function, timer.expires), (8, 16, 24));
        let expire = fixture("6.18", "timer", "timer_expire_entry")
            .timer()
            .unwrap();
        assert_eq!((expire.function, expire.expires), (24, ABSENT));
    }

    #[test]
    fn parses_6_1_formats_without_reason_or_err() {
        let reset = fixture("6.1", "tcp", "tcp_send_reset")
            .send_reset()
            .unwrap();
        assert_eq!(reset.reason, ABSENT);
        assert_eq!(reset.state, 24);
        assert_eq!(reset.skaddr, 16);
        let retransmit = fixture("6.1", "tcp", "tcp_retransmit_skb")
            .retransmit()
            .unwrap();
        assert_eq!(retransmit.err, ABSENT);
    }

    #[test]
    fn rejects_garbage() {
        let path = Path::new("bad/format");
        assert!(TracepointFormat::parse(path, "this is not a format file").is_err());
        assert!(
            TracepointFormat::parse(path, "name: x\nformat:\n\tfield:int; offset:zz; size:4;\n")
                .is_err()
        );
        let missing = TracepointFormat::parse(
            path,
            "name: x\nformat:\n\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n",
        )
        .unwrap();
        assert!(matches!(
            missing.set_state(),
            Err(TracefsError::MissingField {
                field: "skaddr",
                ..
            })
        ));
    }

    #[test]
    fn live_kernel_formats() {
        let tracefs = Path::new("/sys/kernel/tracing");
        let Ok(Some(format)) = TracepointFormat::read(tracefs, "sock", "inet_sock_set_state")
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "tracefs must be readable in CI"
            );
            eprintln!("SKIPPED: live tracefs not readable");
            return;
        };
        format
            .set_state()
            .expect("live inet_sock_set_state has what ka needs");
        for (category, name) in [("tcp", "tcp_receive_reset"), ("tcp", "tcp_destroy_sock")] {
            TracepointFormat::read(tracefs, category, name)
                .unwrap()
                .unwrap()
                .sk_record()
                .unwrap();
        }
        TracepointFormat::read(tracefs, "tcp", "tcp_send_reset")
            .unwrap()
            .unwrap()
            .send_reset()
            .unwrap();
        TracepointFormat::read(tracefs, "timer", "timer_start")
            .unwrap()
            .unwrap()
            .timer()
            .unwrap();
    }
}
