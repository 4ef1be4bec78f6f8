//! Ambit's wire types, generated at build time from `proto/` (see `build.rs`):
//! Envoy's delta ADS transport, the mesh resources it carries (workloads,
//! services, authorization, waypoint L7 config) and the CA service.
//!
//! Module paths follow the protobuf packages, because generated code refers to
//! other packages by relative paths (`super::super::...`). The Ambit packages are
//! re-exported under short names: [`workload`], [`security`], [`waypoint_l7`], [`ca`].

/// Declares a module holding one file generated into `OUT_DIR`. The allows cover
/// generated code only (prost/tonic output follows its own style); hand-written
/// code in this crate stays under the workspace lints.
macro_rules! generated {
    ($(#[$attr:meta])* pub mod $name:ident => $file:literal;) => {
        $(#[$attr])*
        #[allow(missing_debug_implementations, rust_2018_idioms, clippy::all)]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

/// Envoy's API packages, reduced to what the mesh uses but wire-compatible.
pub mod envoy {
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.discovery.*`
        pub mod discovery {
            generated! {
                /// `envoy.service.discovery.v3`: delta ADS messages, client and server.
                pub mod v3 => "envoy.service.discovery.v3.rs";
            }
        }
    }

    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core.*`
        pub mod core {
            generated! {
                /// `envoy.config.core.v3`: the requesting proxy's [`v3::Node`].
                pub mod v3 => "envoy.config.core.v3.rs";
            }
        }
    }
}

/// Google API packages.
pub mod google {
    generated! {
        /// `google.rpc`: the gRPC error model ([`rpc::Status`]), used in xDS NACKs.
        pub mod rpc => "google.rpc.rs";
    }
}

/// The `ambit.*` packages, nested as protobuf expects; exported flat below.
mod ambit {
    pub mod workload {
        generated! { pub mod v1 => "ambit.workload.v1.rs"; }
    }
    pub mod security {
        generated! { pub mod v1 => "ambit.security.v1.rs"; }
    }
    pub mod waypoint {
        generated! { pub mod v1 => "ambit.waypoint.v1.rs"; }
    }
    pub mod ca {
        generated! { pub mod v1 => "ambit.ca.v1.rs"; }
    }
    pub mod zds {
        generated! { pub mod v1 => "ambit.zds.v1.rs"; }
    }
}

/// `ambit.workload.v1`: workloads, services and waypoint addresses (L4 model).
pub use ambit::workload::v1 as workload;

/// `ambit.security.v1`: L4 authorization policies enforced by ztunnel.
pub use ambit::security::v1 as security;

/// `ambit.waypoint.v1`: the waypoint's L7 configuration.
pub use ambit::waypoint::v1 as waypoint_l7;

/// `ambit.ca.v1`: the certificate service (CSR in, SPIFFE cert chain out).
pub use ambit::ca::v1 as ca;

/// `ambit.zds.v1`: the node agent <-> ztunnel protocol (pods and their namespaces).
pub use ambit::zds::v1 as zds;

/// `google.protobuf.Any`, wire-identical to `prost_types::Any`, with the value
/// held as [`bytes::Bytes`]: an xDS server puts one stored resource body into
/// many responses by reference instead of copying it into each.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Any {
    /// `type.googleapis.com/<package>.<Message>`.
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The encoded message.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: bytes::Bytes,
}

/// xDS type URL of [`workload::Workload`] resources.
pub const WORKLOAD_TYPE_URL: &str = "type.googleapis.com/ambit.workload.v1.Workload";

/// xDS type URL of [`workload::Service`] resources.
pub const SERVICE_TYPE_URL: &str = "type.googleapis.com/ambit.workload.v1.Service";

/// xDS type URL of [`workload::Address`] resources (a workload or a service).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/ambit.workload.v1.Address";

/// xDS type URL of [`security::Authorization`] resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/ambit.security.v1.Authorization";

/// xDS type URL of [`waypoint_l7::L7Config`] resources.
pub const L7_CONFIG_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.L7Config";

/// The encoded `google.protobuf.FileDescriptorSet` of every compiled `.proto`
/// (imports included), for gRPC server reflection or schema checks.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));
