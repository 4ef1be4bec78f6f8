//! The root's directory: loaded as it is (it may be a read-only Kubernetes Secret),
//! or generated there at first start under a lock, so two istiod-lites sharing the
//! directory agree on one root. Only generation writes: `ca-key.pem` 0600,
//! `ca-cert.pem` and `root-cert.pem` 0644, each through a rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mesh_core::ca::LocalCa;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::root::{CA_CERT_FILE, CA_KEY_FILE, CaRoot, CertTtl, ROOT_CERT_FILE, RootError};

/// Held (flock) while a root is generated or found, in the directory itself.
pub const LOCK_FILE: &str = ".ca-dir.lock";

impl CaRoot {
    /// Loads the root from `dir`, or generates it there when neither file exists.
    /// Refuses a key file accessible to group or others, a key that does not match
    /// the certificate, a root that is not a CA or has expired, and an intermediate
    /// in `ca-cert.pem`. Loading writes nothing.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        ttl: CertTtl,
    ) -> Result<Self, RootError> {
        Self::check_settings(trust_domain, ttl)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        // Both files in place are final (the certificate is written last): no lock,
        // so a read-only directory loads.
        let (has_cert, has_key) = (exists(&cert_path)?, exists(&key_path)?);
        let root = if has_cert && has_key {
            load(dir, trust_domain, ttl)?
        } else if has_cert {
            // Never a moment of generation (the certificate comes last), so no
            // lock to wait for: say what is missing, also in a read-only directory.
            return Err(incomplete(cert_path, key_path));
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(io_at(dir))?;
            let _lock = lock(dir)?;
            // Another process may have generated the root while this one waited.
            match (exists(&cert_path)?, exists(&key_path)?) {
                (true, true) => load(dir, trust_domain, ttl)?,
                (false, false) => generate(dir, trust_domain, ttl)?,
                (true, false) => return Err(incomplete(cert_path, key_path)),
                (false, true) => return Err(incomplete(key_path, cert_path)),
            }
        };
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
}

fn generate(dir: &Path, trust_domain: &str, ttl: CertTtl) -> Result<CaRoot, RootError> {
    let root = CaRoot::generate(trust_domain, ttl)?;
    // The key first and the certificate last: a certificate on disk always has its
    // key and the public copy beside it.
    write_atomically(
        &dir.join(CA_KEY_FILE),
        root.local_ca().root_key_pem().as_bytes(),
        0o600,
    )?;
    let pem = root.root_pem().as_bytes();
    write_atomically(&dir.join(ROOT_CERT_FILE), pem, 0o644)?;
    write_atomically(&dir.join(CA_CERT_FILE), pem, 0o644)?;
    tracing::info!(dir = %dir.display(), trust_domain, "generated a new mesh root");
    Ok(root)
}

fn load(dir: &Path, trust_domain: &str, ttl: CertTtl) -> Result<CaRoot, RootError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let mode = fs::metadata(&key_path)
        .map_err(io_at(&key_path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(RootError::KeyMode {
            path: key_path,
            mode,
        });
    }
    let cert_pem = fs::read_to_string(&cert_path).map_err(io_at(&cert_path))?;
    let key_pem = Zeroizing::new(fs::read_to_string(&key_path).map_err(io_at(&key_path))?);
    // The checks ztunnel's --ca-cert/--ca-key get too: the key is the
    // certificate's, which is a CA and has not expired.
    let ca =
        LocalCa::from_pem(&cert_pem, &key_pem, ttl.default).map_err(|source| RootError::Root {
            cert: cert_path.clone(),
            key: key_path.clone(),
            source: Box::new(source),
        })?;
    refuse_intermediate(&cert_path, &ca.root())?;
    check_public_copy(&dir.join(ROOT_CERT_FILE), &ca.root());
    tracing::info!(cert = %cert_path.display(), trust_domain, "loaded the mesh root");
    Ok(CaRoot::from_local_ca(ca, trust_domain, ttl))
}

/// Istio's plug-in layout (`cacerts`) puts an intermediate in `ca-cert.pem` and the
/// root in `root-cert.pem`. istiod-lite signs from a root only: its chains end
/// with `ca-cert.pem` and the proxies trust that file, so an intermediate would
/// silently become the mesh's trust anchor. Refused, saying why.
fn refuse_intermediate(cert_path: &Path, cert: &CertificateDer<'_>) -> Result<(), RootError> {
    let invalid = |problem: String| RootError::Invalid {
        path: cert_path.to_owned(),
        problem,
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| invalid(e.to_string()))?;
    if parsed.subject().as_raw() != parsed.issuer().as_raw() {
        return Err(invalid(format!(
            "not a self-signed root (issued by {}): intermediate CAs, as in Istio's \
             plug-in cacerts layout, are not supported; give istiod-lite the root \
             certificate and key",
            parsed.issuer()
        )));
    }
    Ok(())
}

/// `root-cert.pem` is what the proxies are told to trust. When it does not hold the
/// root it is reported, never rewritten: the directory may be read-only, and the
/// file may be the operator's.
fn check_public_copy(path: &Path, root: &CertificateDer<'_>) {
    let holds_root = match fs::read(path) {
        Ok(pem) => CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok_and(|c| c == *root)),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "the public copy of the root cannot be read; proxies given it as --root-cert will not start");
            return;
        }
    };
    if !holds_root {
        tracing::warn!(
            path = %path.display(),
            "does not hold the root of ca-cert.pem: proxies trusting it will refuse the certificates this CA signs (left as is)"
        );
    }
}

/// An exclusive lock on the directory's lock file, released when dropped.
fn lock(dir: &Path) -> Result<File, RootError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_at(&path))?;
    file.lock().map_err(io_at(&path))?;
    Ok(file)
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
/// key is never readable by others, not even for an instant. The temporary name
/// is random: a pid alone is 1 in every container sharing the directory.
pub(super) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), RootError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
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
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
#[path = "root_dir_tests.rs"]
mod tests;
