//! QEMU's member order for the JSON objects it sends.
//!
//! QEMU builds a reply as a `QDict`, a hash table of 512 buckets keyed by QEMU's `tdb_hash` of
//! the member name, and writes the members bucket by bucket; within a bucket the member added
//! last comes first. Its QAPI output visitor adds members in the order the schema declares them.
//! So the order on the wire is a pure function of the member names and their declaration order,
//! and [`object`] reproduces it: given the members in declaration order, it returns the object
//! with QEMU's order (serde_json is built with `preserve_order`). That is what lets the
//! comparison tests require byte-identical replies.

use serde_json::{Map, Value};

/// Buckets in a QEMU `QDict`.
const BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` of a member name.
pub fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    // The length is a size_t truncated to unsigned int in C; names are short.
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i * 5 % 24) as u32;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

fn bucket(name: &str) -> u32 {
    tdb_hash(name) % BUCKETS
}

/// An object whose members, given in QAPI declaration order, come out in QEMU's order.
/// A name given twice keeps its last value (as `qdict_put` replaces).
pub fn object<K: Into<String>>(members: impl IntoIterator<Item = (K, Value)>) -> Value {
    let mut list: Vec<(usize, String, Value)> = Vec::new();
    for (i, (k, v)) in members.into_iter().enumerate() {
        let k = k.into();
        list.retain(|(_, old, _)| *old != k);
        list.push((i, k, v));
    }
    list.sort_by(|(ia, ka, _), (ib, kb, _)| bucket(ka).cmp(&bucket(kb)).then_with(|| ib.cmp(ia)));
    let mut map = Map::new();
    for (_, k, v) in list {
        map.insert(k, v);
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn obj(names: &[&str]) -> Value {
        object(names.iter().map(|n| (*n, Value::Null)))
    }

    #[test]
    fn orders_seen_from_qemu_7_2() {
        // Each left side in QAPI declaration order, each right side as QEMU 7.2 sent it.
        for (declared, wire) in [
            (
                &["running", "singlestep", "status"][..],
                &["status", "singlestep", "running"][..],
            ),
            (&["major", "minor", "micro"], &["micro", "minor", "major"]),
            (&["qemu", "package"], &["qemu", "package"]),
            (&["enabled", "present"], &["enabled", "present"]),
            (
                &["label", "filename", "frontend-open"],
                &["frontend-open", "filename", "label"],
            ),
            (
                &["cpu-index", "qom-path", "thread-id", "props", "target"],
                &["thread-id", "props", "qom-path", "cpu-index", "target"],
            ),
            (
                &["socket-id", "die-id", "core-id", "thread-id"],
                &["core-id", "thread-id", "die-id", "socket-id"],
            ),
            (
                &["name", "meta-type", "arg-type", "ret-type"],
                &["name", "ret-type", "meta-type", "arg-type"],
            ),
            (
                &["name", "meta-type", "members", "tag", "variants"],
                &["name", "tag", "variants", "members", "meta-type"],
            ),
            (
                &["name", "meta-type", "members", "values"],
                &["name", "members", "meta-type", "values"],
            ),
            (&["name", "type", "default"], &["name", "default", "type"]),
            (
                &["name", "type", "help", "default"],
                &["name", "help", "default", "type"],
            ),
            (&["option", "parameters"], &["parameters", "option"]),
        ] {
            assert_eq!(keys(&obj(declared)), wire, "{declared:?}");
        }
    }

    #[test]
    fn a_repeated_name_keeps_its_last_value() {
        let v = object([("a", json!(1)), ("b", json!(2)), ("a", json!(3))]);
        assert_eq!(v["a"], json!(3));
        assert_eq!(v.as_object().map(Map::len), Some(2));
    }
}
