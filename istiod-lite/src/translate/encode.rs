//! Deterministic protobuf encoding of the resources. prost encodes a `map` field
//! in its `HashMap`'s iteration order, which differs between two equal maps; the
//! xDS store compares resources by their bytes, so equal content must give equal
//! bytes. A message is encoded without its maps, then each map entry is appended
//! in key order as a message holding only that entry: protobuf parsing merges
//! concatenated messages and map entries accumulate, so the result decodes to the
//! same message.

use std::collections::HashMap;

use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use bytes::Bytes;
use prost::Message;

/// Appends `map`'s entries in key order, each as `single(key, value)` encoded alone.
fn append_sorted<V: Clone, M: Message>(
    buf: &mut Vec<u8>,
    map: &HashMap<String, V>,
    single: impl Fn(HashMap<String, V>) -> M,
) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        if let Some(value) = map.get(key) {
            let entry = single(HashMap::from([(key.clone(), value.clone())]));
            entry.encode_raw(buf);
        }
    }
}

pub(super) fn workload(mut base: pb::Workload) -> Bytes {
    let services = std::mem::take(&mut base.services);
    let labels = std::mem::take(&mut base.labels);
    let mut buf = base.encode_to_vec();
    append_sorted(&mut buf, &services, |services| pb::Workload {
        services,
        ..Default::default()
    });
    append_sorted(&mut buf, &labels, |labels| pb::Workload {
        labels,
        ..Default::default()
    });
    Bytes::from(buf)
}

pub(super) fn service(s: &pb::Service) -> Bytes {
    Bytes::from(s.encode_to_vec())
}

pub(super) fn authorization(mut base: sec::Authorization) -> Bytes {
    let selector = std::mem::take(&mut base.selector);
    let mut buf = base.encode_to_vec();
    append_sorted(&mut buf, &selector, |selector| sec::Authorization {
        selector,
        ..Default::default()
    });
    Bytes::from(buf)
}
