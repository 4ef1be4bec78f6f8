//! The mesh root: loaded from a directory, or generated there at first start
//! (`ca-cert.pem`, `ca-key.pem` written 0600 through a rename, and the public
//! `root-cert.pem` for clients). Signing is mesh-core's [`LocalCa`]: one
//! implementation for the local and the remote CA.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::ca::{LocalCa, validity_for};
use mesh_core::{CertError, SpiffeId};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::csr::VerifiedCsr;

/// The root's certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The root's private key (PKCS#8), mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The root certificate again, for clients to trust.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Default and maximum lifetime of the certificates the CA signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertTtl {
    /// Granted when a request asks for 0 (the CA's choice).
    pub default: Duration,
    /// No certificate lives longer, whatever the request asks.
    pub max: Duration,
}

impl Default for CertTtl {
    fn default() -> Self {
        Self {
            default: mesh_core::ca::DEFAULT_CERT_TTL,
            max: mesh_core::ca::DEFAULT_CERT_TTL,
        }
    }
}

impl CertTtl {
    /// The lifetime granted for a request of `requested` (zero: the default).
    pub fn grant(&self, requested: Duration) -> Duration {
        if requested.is_zero() {
            self.default
        } else {
            requested.min(self.max)
        }
    }
}

/// Why the root cannot be loaded, generated or used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} has mode {mode:04o}: the CA key must not be accessible to group or others \
         (chmod 600, or defaultMode 0400 for a Kubernetes secret)",
        path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error(
        "{} exists but {} does not: restore the missing file, or remove both to generate a new root",
        present.display(), missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{} with {}: {source}", cert.display(), key.display())]
    Root {
        cert: PathBuf,
        key: PathBuf,
        source: Box<CertError>,
    },
    #[error("CA certificate lifetimes: {0}")]
    Ttl(String),
    #[error("trust domain {0:?}: {1}")]
    TrustDomain(String, mesh_core::SpiffeIdError),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// The mesh's signing root, its trust domain and the lifetimes it grants.
pub struct CaRoot {
    ca: LocalCa,
    trust_domain: String,
    ttl: CertTtl,
}

impl std::fmt::Debug for CaRoot {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .field("root_not_after", &self.ca.not_after())
            .finish_non_exhaustive()
    }
}

impl CaRoot {
    /// Loads the root from `dir`, or generates it there when neither file exists.
    /// Refuses a key file accessible to group or others, a key that does not match
    /// the certificate, and a root that is not a CA or has expired.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        ttl: CertTtl,
    ) -> Result<Self, RootError> {
        check_settings(trust_domain, ttl)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let root = match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(&cert_path, &key_path, trust_domain, ttl)?,
            (false, false) => {
                let root = Self::generate(trust_domain, ttl)?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .map_err(io_at(dir))?;
                // The key first: a certificate on disk always has its key beside it.
                write_atomically(&key_path, root.ca.root_key_pem().as_bytes(), 0o600)?;
                write_atomically(&cert_path, root.ca.root_pem().as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), trust_domain, "generated a new mesh root");
                root
            }
            (true, false) => return Err(incomplete(cert_path, key_path)),
            (false, true) => return Err(incomplete(key_path, cert_path)),
        };
        let public = dir.join(ROOT_CERT_FILE);
        if fs::read_to_string(&public).ok().as_deref() != Some(root.root_pem()) {
            write_atomically(&public, root.root_pem().as_bytes(), 0o644)?;
        }
        let left = root.not_after() - OffsetDateTime::now_utc();
        if time::Duration::try_from(ttl.max).map_or(true, |max| max > left) {
            // Not refused: every root gets there as it ages. Signing cuts each
            // certificate at the root's end.
            tracing::warn!(
                max_cert_ttl = ?ttl.max,
                root_not_after = %root.not_after(),
                "the maximum certificate TTL reaches past the root's expiry: certificates end with the root"
            );
        }
        Ok(root)
    }

    /// A new root held in memory only (tests, tools).
    pub fn generate(trust_domain: &str, ttl: CertTtl) -> Result<Self, RootError> {
        check_settings(trust_domain, ttl)?;
        let ca = LocalCa::generate(&format!("Ambit mesh root ({trust_domain})"), ttl.default)?;
        Ok(Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
        })
    }

    fn load(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &str,
        ttl: CertTtl,
    ) -> Result<Self, RootError> {
        let mode = fs::metadata(key_path)
            .map_err(io_at(key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(RootError::KeyMode {
                path: key_path.to_owned(),
                mode,
            });
        }
        let cert_pem = fs::read_to_string(cert_path).map_err(io_at(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_at(key_path))?;
        // The checks ztunnel's --ca-cert/--ca-key get too: the key is the
        // certificate's, which is a CA and has not expired.
        let ca = LocalCa::from_pem(&cert_pem, &key_pem, ttl.default).map_err(|source| {
            RootError::Root {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                source: Box::new(source),
            }
        })?;
        tracing::info!(cert = %cert_path.display(), trust_domain, "loaded the mesh root");
        Ok(Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> CertTtl {
        self.ttl
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.root()
    }

    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// When the root expires: no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.ca.not_after()
    }

    /// Signs the CSR's key for its verified identity, valid `ttl` (already granted
    /// by [`CertTtl::grant`]) and never past the root. Returns the PEM chain, leaf
    /// first and root last.
    pub fn sign(&self, csr: &VerifiedCsr, ttl: Duration) -> Result<Vec<String>, RootError> {
        let (not_before, not_after) = validity_for(ttl);
        let leaf = self.ca.sign_public_key(
            csr.public_key(),
            &[csr.identity().to_string()],
            &[],
            not_before,
            not_after,
        )?;
        Ok(vec![leaf.pem(), self.root_pem().to_owned()])
    }

    /// A leaf with a fresh key for the control plane's own serving certificate.
    pub(super) fn sign_serving(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
    ) -> Result<(rcgen::KeyPair, CertificateDer<'static>), RootError> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| CertError::Ca(format!("generate key: {e}")))?;
        let (not_before, not_after) = validity_for(self.ttl.default);
        let cert = self.ca.sign_public_key(
            &key,
            &[identity.to_string()],
            dns_names,
            not_before,
            not_after,
        )?;
        Ok((key, cert.der().clone()))
    }
}

fn check_settings(trust_domain: &str, ttl: CertTtl) -> Result<(), RootError> {
    SpiffeId::new(trust_domain, "ns", "sa")
        .map_err(|e| RootError::TrustDomain(trust_domain.to_owned(), e))?;
    if ttl.default.is_zero() || ttl.max.is_zero() {
        return Err(RootError::Ttl(
            "the default and maximum TTL must be above zero".into(),
        ));
    }
    if ttl.default > ttl.max {
        return Err(RootError::Ttl(format!(
            "the default TTL ({:?}) is above the maximum ({:?})",
            ttl.default, ttl.max
        )));
    }
    Ok(())
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RootError + '_ {
    move |source| RootError::Io {
        path: path.to_owned(),
        source,
    }
}

fn exists(path: &Path) -> Result<bool, RootError> {
    path.try_exists().map_err(io_at(path))
}

fn incomplete(present: PathBuf, missing: PathBuf) -> RootError {
    RootError::Incomplete { present, missing }
}

/// Writes `contents` to a temporary file created with `mode` beside `path`, then
/// renames it over `path`: readers see the old file or the whole new one, and the
/// key is never readable by others, not even for an instant.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), RootError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&tmp)(e)),
    }
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have removed bits; the mode is exactly what was asked.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_at(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_at(path))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generated_once_then_loaded_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
        assert_eq!(mode_of(&dir.path().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode_of(&dir.path().join(ROOT_CERT_FILE)), 0o644);
        let again =
            CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
        assert_eq!(first.root(), again.root());
        let public = fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(public, first.root_pem());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_key_open_to_others_is_refused_naming_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err =
            CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RootError::KeyMode { mode: 0o640, .. }),
            "{text}"
        );
        assert!(
            text.contains("ca-key.pem") && text.contains("0640"),
            "{text}"
        );
    }

    #[test]
    fn a_lone_file_or_a_foreign_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
        let other = CaRoot::generate("cluster.local", CertTtl::default()).unwrap();
        write_atomically(
            &dir.path().join(CA_KEY_FILE),
            other.ca.root_key_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        let err =
            CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
        assert!(matches!(err, RootError::Root { .. }), "{err}");
        assert!(
            err.to_string().contains(
                "ca-key.pem: certificate authority: root key: not the key of the root certificate"
            ),
            "{err}"
        );

        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err =
            CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
        assert!(matches!(err, RootError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains("ca-key.pem does not"), "{err}");
    }

    #[test]
    fn a_huge_ttl_is_signed_up_to_the_root_end() {
        let ttl = CertTtl {
            default: mesh_core::ca::DEFAULT_CERT_TTL,
            max: Duration::MAX,
        };
        let root = CaRoot::generate("cluster.local", ttl).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/cart".try_into().unwrap(),
        )];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = super::super::csr::verify_csr(&pem, "cluster.local").unwrap();
        let granted = ttl.grant(Duration::from_secs(i64::MAX as u64));
        let chain = root.sign(&csr, granted).unwrap();
        let leaf: CertificateDer<'_> =
            rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(parsed.validity().not_after.to_datetime(), root.not_after());
    }

    #[test]
    fn ttl_settings_are_checked_and_granted() {
        let hour = Duration::from_secs(3600);
        let ttl = CertTtl {
            default: hour,
            max: 2 * hour,
        };
        assert_eq!(ttl.grant(Duration::ZERO), hour);
        assert_eq!(ttl.grant(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(ttl.grant(10 * hour), 2 * hour);
        let bad = CertTtl {
            default: 3 * hour,
            max: hour,
        };
        let err = CaRoot::generate("cluster.local", bad).unwrap_err();
        assert!(err.to_string().contains("above the maximum"), "{err}");
        let err = CaRoot::generate("Bad:TD", CertTtl::default()).unwrap_err();
        assert!(matches!(err, RootError::TrustDomain(..)), "{err}");
    }
}
