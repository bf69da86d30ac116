//! QMP wire format: splitting the input stream into JSON values, validating a request the way
//! QEMU's dispatcher does, and writing replies, errors, events and the greeting exactly in
//! QEMU's shape (`"key": value, ...` spacing, `\r\n` line ends, members in QEMU's order).
//!
//! Input, like QEMU's streaming JSON parser, is not line-based: a request may span lines and
//! several may share one. [`Splitter`] tracks strings and nesting to find where each top-level
//! value ends, and enforces the limits (value size, nesting depth) without ever buffering more
//! than [`MAX_MESSAGE_BYTES`]. A malformed value produces an error reply and the session goes on.
//! A raw control character (other than whitespace) outside a string, or any byte 0xFF, resets the
//! parser as in QEMU, which lets a client resynchronise after sending garbage.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Largest request accepted, in bytes (QEMU: 64 MiB; nothing in QMP comes near 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Deepest nesting of arrays and objects accepted (QEMU: 1024; serde_json's own limit is 128).
pub const MAX_NESTING: usize = 64;

/// QMP error classes (QAPI `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything but the specific classes below.
    GenericError,
    /// The command does not exist (or is not available in this mode).
    CommandNotFound,
    /// A device has no driver / medium.
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability.
    KvmMissingCap,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// An error reply's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.desc)
    }
}

/// One item cut from the input stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// The bytes of one complete top-level JSON value (not yet parsed).
    Value(Vec<u8>),
    /// The input was malformed; reply with this error (no id) and go on.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside an object or array.
    Nested,
    /// Inside a bare top-level scalar (number, keyword, or garbage).
    Scalar,
    /// Inside a top-level string.
    TopString,
}

/// Splits a byte stream into top-level JSON values.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    state: State,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// The current value overflowed a limit: skip it to its end without storing it.
    discarding: bool,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Splitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        Splitter {
            buf: Vec::new(),
            state: State::Idle,
            depth: 0,
            in_string: false,
            escape: false,
            discarding: false,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.discarding = false;
    }

    fn push(&mut self, b: u8, out: &mut Vec<Chunk>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE_BYTES {
            self.buf = Vec::new();
            self.discarding = true;
            out.push(Chunk::Error("JSON token size limit exceeded".into()));
            return;
        }
        self.buf.push(b);
    }

    fn finish(&mut self, out: &mut Vec<Chunk>) {
        if !self.discarding {
            out.push(Chunk::Value(std::mem::take(&mut self.buf)));
        }
        self.reset();
    }

    /// Feeds bytes; returns every value (or error) completed by them.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Chunk> {
        let mut out = Vec::new();
        for &b in data {
            self.byte(b, &mut out);
        }
        out
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Chunk>) {
        // 0xFF never occurs in UTF-8: QEMU's lexer treats it as a reset request.
        if b == 0xff {
            if self.state != State::Idle {
                out.push(Chunk::Error("JSON parse error, stray '\\xff'".into()));
            }
            self.reset();
            return;
        }
        let in_str = self.in_string || self.state == State::TopString;
        if b < 0x20 && in_str {
            // A raw control character inside a string is invalid JSON: report and resync.
            out.push(Chunk::Error(
                "JSON parse error, control character in string".into(),
            ));
            self.reset();
            return;
        }
        if b < 0x20 && !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(Chunk::Error(format!(
                "JSON parse error, stray '\\u{:04x}'",
                b
            )));
            self.reset();
            return;
        }
        match self.state {
            State::Idle => match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'{' | b'[' => {
                    self.state = State::Nested;
                    self.depth = 1;
                    self.push(b, out);
                }
                b'}' | b']' => out.push(Chunk::Error("JSON parse error, expecting value".into())),
                b'"' => {
                    self.state = State::TopString;
                    self.push(b, out);
                }
                _ => {
                    self.state = State::Scalar;
                    self.push(b, out);
                }
            },
            State::TopString => {
                self.push(b, out);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.finish(out);
                }
            }
            State::Scalar => match b {
                b' ' | b'\t' | b'\n' | b'\r' => self.finish(out),
                b'{' | b'[' | b'}' | b']' | b'"' | b',' | b':' => {
                    self.finish(out);
                    self.byte(b, out);
                }
                _ => self.push(b, out),
            },
            State::Nested => {
                self.push(b, out);
                if self.in_string {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                    return;
                }
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => {
                        self.depth += 1;
                        if self.depth > MAX_NESTING && !self.discarding {
                            self.buf = Vec::new();
                            self.discarding = true;
                            out.push(Chunk::Error("JSON nesting depth limit exceeded".into()));
                        }
                    }
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.finish(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// True when no partial value is buffered.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// Its arguments (an empty object when absent).
    pub arguments: Map<String, Value>,
    /// The `id`, exactly as sent (whitespace normalised), if any.
    pub id: Option<Box<RawValue>>,
}

/// A request that failed validation, with the id to echo if one could be read.
#[derive(Debug)]
pub struct BadRequest {
    /// The error to report.
    pub error: QmpError,
    /// The request's id, if it had a readable one.
    pub id: Option<Box<RawValue>>,
}

/// Parses and validates one top-level value as QEMU's `qmp_dispatch_check_obj` does.
pub fn parse_request(bytes: &[u8]) -> Result<Request, BadRequest> {
    let bad = |desc: String, id: Option<Box<RawValue>>| BadRequest {
        error: QmpError::generic(desc),
        id,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| {
        bad(
            "JSON parse error, invalid UTF-8 sequence in string".into(),
            None,
        )
    })?;
    // Syntax first (numbers are checked for form only, so an id like 1e400 survives).
    let whole: Box<RawValue> = serde_json::from_str(text)
        .map_err(|e| bad(format!("JSON parse error, {}", json_error_text(&e)), None))?;
    if !whole.get().starts_with('{') {
        return Err(bad("QMP input must be a JSON object".into(), None));
    }
    // The top level with every member kept raw, so `id` echoes exactly.
    let members: RawMembers = serde_json::from_str(whole.get())
        .map_err(|e| bad(format!("JSON parse error, {}", json_error_text(&e)), None))?;
    let id = members
        .0
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| normalize_raw(v));
    let mut execute = None;
    let mut arguments = None;
    for (key, raw) in &members.0 {
        match key.as_str() {
            "execute" => match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::String(s)) => execute = Some(s),
                _ => {
                    return Err(bad(
                        "QMP input member 'execute' must be a string".into(),
                        id,
                    ))
                }
            },
            "arguments" => match serde_json::from_str::<StrictValue>(raw.get()) {
                Ok(StrictValue(Value::Object(m))) => arguments = Some(m),
                Err(e) => {
                    return Err(bad(
                        format!("JSON parse error, {}", json_error_text(&e)),
                        id,
                    ))
                }
                Ok(_) => {
                    return Err(bad(
                        "QMP input member 'arguments' must be an object".into(),
                        id,
                    ))
                }
            },
            "id" => {}
            // We never offer the 'oob' capability, so 'exec-oob' is unexpected, as in QEMU
            // on a session that did not enable it.
            other => return Err(bad(format!("QMP input member '{other}' is unexpected"), id)),
        }
    }
    let Some(execute) = execute else {
        return Err(bad("QMP input lacks member 'execute'".into(), id));
    };
    Ok(Request {
        execute,
        arguments: arguments.unwrap_or_default(),
        id,
    })
}

/// serde_json's message, which ends in " at line L column C" (kept: it helps the client).
fn json_error_text(e: &serde_json::Error) -> String {
    e.to_string()
}

/// A JSON value that refuses duplicate object keys (QEMU: "JSON parse error, duplicate key").
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(StrictValue(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom("duplicate key"));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// The top-level members of an object, each kept as raw JSON, in input order.
struct RawMembers(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for RawMembers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawMembers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawMembers, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if v.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    let raw: Box<RawValue> = map.next_value()?;
                    v.push((k, raw));
                }
                Ok(RawMembers(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Re-spaces raw JSON QEMU's way (`", "` and `": "`, no other whitespace outside strings), so an
/// echoed id is the client's own text, digits and escapes untouched, but always on one line.
pub fn normalize_raw(raw: &RawValue) -> Box<RawValue> {
    let src = raw.get();
    let mut out = String::with_capacity(src.len() + 8);
    let mut in_str = false;
    let mut esc = false;
    for c in src.chars() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            ' ' | '\t' | '\n' | '\r' => {}
            '"' => {
                in_str = true;
                out.push(c);
            }
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            _ => out.push(c),
        }
    }
    RawValue::from_string(out).unwrap_or_else(|_| raw.to_owned())
}

/// serde_json formatter that spaces like QEMU's JSON writer: `{"a": 1, "b": [1, 2]}`.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Serialises `value` QEMU's way and appends the `\r\n` QEMU ends every message with.
pub fn to_line<T: Serialize + ?Sized>(value: &T) -> String {
    let mut buf = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, QemuFormatter);
    if value.serialize(&mut ser).is_err() {
        // Only non-string map keys can fail, and no message type here has them.
        buf.clear();
        buf.extend_from_slice(br#"{"error": {"class": "GenericError", "desc": "internal error: unserialisable reply"}}"#);
    }
    buf.extend_from_slice(b"\r\n");
    // serde_json only ever writes valid UTF-8.
    String::from_utf8(buf).unwrap_or_default()
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'static str,
    desc: &'a str,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    error: ErrorBody<'a>,
}

/// `{"return": VALUE[, "id": ID]}`.
pub fn return_line(ret: &Value, id: Option<&RawValue>) -> String {
    to_line(&ReturnMsg { ret, id })
}

/// `{["id": ID, ]"error": {"class": ..., "desc": ...}}` (QEMU puts the id first on errors).
pub fn error_line(err: &QmpError, id: Option<&RawValue>) -> String {
    to_line(&ErrorMsg {
        id,
        error: ErrorBody {
            class: err.class.as_str(),
            desc: &err.desc,
        },
    })
}

/// QEMU version triple as QMP reports it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VersionTriple {
    /// Micro.
    pub micro: u32,
    /// Minor.
    pub minor: u32,
    /// Major.
    pub major: u32,
}

/// The QEMU version level Bulkhead's QMP claims: 2.12.0, the level whose core command set
/// (capabilities negotiation, run-state control, events) it implements faithfully; features
/// beyond it must be discovered per command, never assumed from the version.
pub const QMP_VERSION: VersionTriple = VersionTriple {
    micro: 0,
    minor: 12,
    major: 2,
};

/// The `package` string.
pub fn package() -> String {
    format!("bulkhead {}", env!("CARGO_PKG_VERSION"))
}

/// The `query-version` value.
pub fn version_value() -> Value {
    let mut qemu = Map::new();
    qemu.insert("micro".into(), QMP_VERSION.micro.into());
    qemu.insert("minor".into(), QMP_VERSION.minor.into());
    qemu.insert("major".into(), QMP_VERSION.major.into());
    let mut v = Map::new();
    v.insert("qemu".into(), Value::Object(qemu));
    v.insert("package".into(), package().into());
    Value::Object(v)
}

/// The greeting line sent when a session opens.
pub fn greeting_line() -> String {
    let mut qmp = Map::new();
    qmp.insert("version".into(), version_value());
    qmp.insert("capabilities".into(), Value::Array(Vec::new()));
    let mut top = Map::new();
    top.insert("QMP".into(), Value::Object(qmp));
    to_line(&Value::Object(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(chunks: Vec<Chunk>) -> Vec<String> {
        chunks
            .into_iter()
            .map(|c| match c {
                Chunk::Value(v) => String::from_utf8(v).expect("utf8"),
                Chunk::Error(e) => format!("ERR {e}"),
            })
            .collect()
    }

    #[test]
    fn splits_values_across_and_within_lines() {
        let mut s = Splitter::new();
        assert_eq!(values(s.feed(b"{\"execute\":")), Vec::<String>::new());
        assert!(!s.is_idle());
        assert_eq!(
            values(s.feed(b" \"x\" \n }{\"a\":\"}\\\"{\"} [1,[2]] \"s\" 12 true\n")),
            vec![
                "{\"execute\": \"x\" \n }".to_string(),
                "{\"a\":\"}\\\"{\"}".into(),
                "[1,[2]]".into(),
                "\"s\"".into(),
                "12".into(),
                "true".into()
            ]
        );
        assert!(s.is_idle());
        assert_eq!(values(s.feed(b"xx{}")), vec!["xx", "{}"]);
        assert_eq!(
            values(s.feed(b"]")),
            vec!["ERR JSON parse error, expecting value"]
        );
    }

    #[test]
    fn limits_and_resync() {
        let mut s = Splitter::new();
        let deep = "[".repeat(MAX_NESTING + 1) + &"]".repeat(MAX_NESTING + 1);
        assert_eq!(
            values(s.feed(deep.as_bytes())),
            vec!["ERR JSON nesting depth limit exceeded"]
        );
        assert!(s.is_idle());
        let mut big = b"{\"id\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE_BYTES + 10));
        big.extend_from_slice(b"\"}{}");
        assert_eq!(
            values(s.feed(&big)),
            vec!["ERR JSON token size limit exceeded", "{}"]
        );
        // A control character in a string, or 0xff anywhere, resets the parser.
        assert_eq!(
            values(s.feed(b"{\"a\":\"x\n{}")),
            vec!["ERR JSON parse error, control character in string", "{}"]
        );
        assert_eq!(
            values(s.feed(b"{\"a\":\xff{}")),
            vec!["ERR JSON parse error, stray '\\xff'", "{}"]
        );
        assert_eq!(
            values(s.feed(b"\x00{}")),
            vec!["ERR JSON parse error, stray '\\u0000'", "{}"]
        );
    }

    fn req(s: &str) -> Result<Request, BadRequest> {
        parse_request(s.as_bytes())
    }

    fn bad(s: &str) -> (String, Option<String>) {
        let e = req(s).expect_err(s);
        assert_eq!(e.error.class, ErrorClass::GenericError);
        (e.error.desc, e.id.map(|i| i.get().to_string()))
    }

    #[test]
    fn request_validation_matches_qemu() {
        let r = req(r#"{"execute":"stop","arguments":{"a":[1,2]},"id":[1,{"a":2}]}"#).expect("ok");
        assert_eq!(r.execute, "stop");
        assert_eq!(r.arguments.get("a"), Some(&serde_json::json!([1, 2])));
        assert_eq!(r.id.expect("id").get(), r#"[1, {"a": 2}]"#);
        assert_eq!(bad("[1]").0, "QMP input must be a JSON object");
        assert_eq!(bad("\"str\"").0, "QMP input must be a JSON object");
        assert_eq!(bad("{}").0, "QMP input lacks member 'execute'");
        assert_eq!(
            bad(r#"{"id":3}"#),
            ("QMP input lacks member 'execute'".into(), Some("3".into()))
        );
        assert_eq!(
            bad(r#"{"foo":1}"#).0,
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            bad(r#"{"execute":1}"#).0,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            bad(r#"{"execute":"stop","arguments":[]}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            bad(r#"{"execute":"stop","arguments":null}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            bad(r#"{"exec-oob":"query-status"}"#).0,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            bad(r#"{"execute":"stop","id":1,"control":{}}"#),
            (
                "QMP input member 'control' is unexpected".into(),
                Some("1".into())
            )
        );
        assert!(bad("xx").0.starts_with("JSON parse error, "));
        assert!(bad(r#"{"execute":"a","id":1,"id":2}"#)
            .0
            .contains("duplicate key"));
        assert!(bad(r#"{"execute":"a","arguments":{"x":1,"x":2}}"#)
            .0
            .contains("duplicate key"));
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        for (sent, echoed) in [
            ("null", "null"),
            ("12345678901234567890123", "12345678901234567890123"),
            ("1e400", "1e400"),
            ("-0", "-0"),
            ("\"\\u00e9 x,y:z\"", "\"\\u00e9 x,y:z\""),
            ("{ \"a\" :\n[1 ,2] }", "{\"a\": [1, 2]}"),
        ] {
            let r = req(&format!(r#"{{"execute":"x","id":{sent}}}"#)).expect(sent);
            let id = r.id.expect("id");
            assert_eq!(id.get(), echoed);
            let line = return_line(&serde_json::json!({}), Some(&id));
            assert_eq!(line, format!("{{\"return\": {{}}, \"id\": {echoed}}}\r\n"));
        }
    }

    #[test]
    fn output_shapes_match_qemu() {
        assert_eq!(
            greeting_line(),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 12, \"major\": 2}, \
             \"package\": \"bulkhead 0.1.0\"}, \"capabilities\": []}}\r\n"
        );
        assert_eq!(
            return_line(&serde_json::json!({}), None),
            "{\"return\": {}}\r\n"
        );
        let id = RawValue::from_string("\"a\"".into()).expect("raw");
        assert_eq!(
            error_line(&QmpError::not_found("The command x has not been found"), Some(&id)),
            "{\"id\": \"a\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\r\n"
        );
    }
}
