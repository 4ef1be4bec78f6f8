//! Wire-compatibility checks for the delta xDS messages: byte-exact encodings
//! worked out by hand from Envoy's field numbers, so a renumbered or retyped field
//! in `discovery.proto` fails here rather than against a real Envoy peer.

use std::collections::{BTreeMap, HashMap};

use ambit_proto::Any;
use ambit_proto::envoy::config::core::v3::Node;
use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use ambit_proto::google::rpc::Status;
use prost::Message;
use prost_types::{Duration, Struct, Value, value::Kind};

/// A request with every field the mesh uses set, each to a one-byte value, so the
/// expected encoding stays small enough to check by hand.
fn full_request() -> DeltaDiscoveryRequest {
    let metadata = Struct {
        fields: BTreeMap::from([(
            "k".to_owned(),
            Value {
                kind: Some(Kind::StringValue("v".to_owned())),
            },
        )]),
    };
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "n".to_owned(),
            cluster: "c".to_owned(),
            metadata: Some(metadata),
        }),
        type_url: "t".to_owned(),
        resource_names_subscribe: vec!["a".to_owned()],
        resource_names_unsubscribe: vec!["b".to_owned()],
        initial_resource_versions: HashMap::from([("r".to_owned(), "1".to_owned())]),
        response_nonce: "x".to_owned(),
        error_detail: Some(Status {
            code: 3,
            message: "m".to_owned(),
            details: vec![Any {
                type_url: "u".to_owned(),
                value: vec![0x01].into(),
            }],
        }),
    }
}

#[test]
fn delta_request_matches_envoy_field_numbers() {
    // Tag byte = (field number << 3) | wire type; wire type 2 = length-delimited,
    // 0 = varint. Numbers from Envoy's envoy/service/discovery/v3/discovery.proto,
    // envoy/config/core/v3/base.proto and googleapis' google/rpc/status.proto.
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x0a, 18,                       // node = 1
            0x0a, 1, b'n',              //   Node.id = 1
            0x12, 1, b'c',              //   Node.cluster = 2
            0x1a, 10,                   //   Node.metadata = 3 (Struct)
                0x0a, 8,                //     Struct.fields = 1 (map entry)
                    0x0a, 1, b'k',      //       key = 1
                    0x12, 3,            //       value = 2 (Value)
                        0x1a, 1, b'v',  //         Value.string_value = 3
        0x12, 1, b't',                  // type_url = 2
        0x1a, 1, b'a',                  // resource_names_subscribe = 3
        0x22, 1, b'b',                  // resource_names_unsubscribe = 4
        0x2a, 6,                        // initial_resource_versions = 5 (map entry)
            0x0a, 1, b'r',              //   key = 1
            0x12, 1, b'1',              //   value = 2
        0x32, 1, b'x',                  // response_nonce = 6
        0x3a, 13,                       // error_detail = 7 (google.rpc.Status)
            0x08, 3,                    //   Status.code = 1 (varint)
            0x12, 1, b'm',              //   Status.message = 2
            0x1a, 6,                    //   Status.details = 3 (Any)
                0x0a, 1, b'u',          //     Any.type_url = 1
                0x12, 1, 0x01,          //     Any.value = 2
    ];
    let request = full_request();
    let bytes = request.encode_to_vec();
    assert_eq!(bytes, expected);
    assert_eq!(DeltaDiscoveryRequest::decode(expected).unwrap(), request);
}

#[test]
fn delta_response_matches_envoy_field_numbers() {
    let response = DeltaDiscoveryResponse {
        system_version_info: "s".to_owned(),
        resources: vec![Resource {
            version: "1".to_owned(),
            resource: Some(Any {
                type_url: "u".to_owned(),
                value: Default::default(),
            }),
            name: "w".to_owned(),
            aliases: vec!["z".to_owned()],
            ttl: Some(Duration {
                seconds: 5,
                nanos: 0,
            }),
        }],
        type_url: "t".to_owned(),
        nonce: "n".to_owned(),
        removed_resources: vec!["r".to_owned()],
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x0a, 1, b's',                  // system_version_info = 1
        0x12, 18,                       // resources = 2 (Resource)
            0x0a, 1, b'1',              //   Resource.version = 1
            0x12, 3,                    //   Resource.resource = 2 (Any)
                0x0a, 1, b'u',          //     Any.type_url = 1
            0x1a, 1, b'w',              //   Resource.name = 3
            0x22, 1, b'z',              //   Resource.aliases = 4
            0x32, 2,                    //   Resource.ttl = 6 (Duration)
                0x08, 5,                //     Duration.seconds = 1
        0x22, 1, b't',                  // type_url = 4
        0x2a, 1, b'n',                  // nonce = 5
        0x32, 1, b'r',                  // removed_resources = 6
    ];
    assert_eq!(response.encode_to_vec(), expected);
    assert_eq!(DeltaDiscoveryResponse::decode(expected).unwrap(), response);
}

#[test]
fn envoy_only_fields_are_skipped_on_decode() {
    // Fields Envoy defines but Ambit leaves out must not break decoding: here
    // resource_locators_subscribe (8, a message) and Node.user_agent_name (6).
    let mut bytes = full_request().encode_to_vec();
    bytes.extend_from_slice(&[0x42, 3, 0x0a, 1, b'q']);
    let mut with_agent = Node {
        id: "n".to_owned(),
        ..Node::default()
    }
    .encode_to_vec();
    with_agent.extend_from_slice(&[0x32, 5, b'e', b'n', b'v', b'o', b'y']);
    let node_field = [&[0x0a, with_agent.len() as u8][..], &with_agent].concat();
    bytes.extend_from_slice(&node_field);

    let decoded = DeltaDiscoveryRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.type_url, "t");
    assert_eq!(decoded.response_nonce, "x");
    // A repeated occurrence of a message field merges into the first one.
    let node = decoded.node.unwrap();
    assert_eq!(node.id, "n");
    assert_eq!(node.cluster, "c");
}
