//! The CA: the mesh root, and `CreateCertificate` for authenticated callers.
