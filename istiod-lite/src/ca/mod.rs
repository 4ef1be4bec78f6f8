//! The CA: the mesh root (loaded or generated at first start), CSR verification,
//! and `CreateCertificate` for authenticated callers, who may obtain only the
//! identities their node runs. Also the control plane's own serving certificate.

pub mod csr;
mod metrics;
pub mod root;
mod root_dir;
pub mod service;
mod serving;

pub use csr::{CsrError, VerifiedCsr, verify_csr};
pub use metrics::{CaMetrics, ReasonLabel};
pub use root::{CaRoot, CertTtl, RootError};
pub use service::{CaService, IdentityPolicy, ReservedIdentities};
pub use serving::{SERVING_DNS_NAME, ServingCert};
