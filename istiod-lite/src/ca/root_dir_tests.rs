//! The root's directory: generated once under a lock, loaded without a write,
//! refused with the reason when incomplete, open to others, foreign or an
//! intermediate.

use std::sync::{Arc, Barrier};
use std::time::SystemTime;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use super::*;

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_once_then_loaded_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    assert_eq!(mode_of(&dir.path().join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode_of(&dir.path().join(ROOT_CERT_FILE)), 0o644);
    let again = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    assert_eq!(first.root(), again.root());
    let public = fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap();
    assert_eq!(public, first.root_pem());
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') && name != LOCK_FILE)
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
        other.local_ca().root_key_pem().as_bytes(),
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

/// What a load could change: each file's bytes and mtime, and the directory's.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, SystemTime)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let modified = e.metadata().unwrap().modified().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).unwrap(), modified)
        })
        .collect();
    files.sort();
    files.push((
        ".".into(),
        Vec::new(),
        fs::metadata(dir).unwrap().modified().unwrap(),
    ));
    files
}

#[test]
fn loading_writes_nothing_not_even_a_public_copy_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let first = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    // An operator's bundle, or a stale copy: reported, never replaced (the
    // directory may be a read-only Secret).
    let other = CaRoot::generate("cluster.local", CertTtl::default()).unwrap();
    fs::write(dir.path().join(ROOT_CERT_FILE), other.root_pem()).unwrap();
    let before = snapshot(dir.path());
    let again = CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap();
    assert_eq!(first.root(), again.root());
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn an_intermediate_in_ca_cert_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "plug-in root");
    let root = params.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "plug-in intermediate");
    let intermediate = params.signed_by(&key, &issuer).unwrap();
    // Istio's cacerts layout: the intermediate and its key, the root beside them.
    write_atomically(
        &dir.path().join(CA_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )
    .unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), intermediate.pem()).unwrap();
    fs::write(dir.path().join(ROOT_CERT_FILE), root.pem()).unwrap();
    let before = snapshot(dir.path());
    let err =
        CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RootError::Invalid { .. }), "{text}");
    assert!(
        text.contains("ca-cert.pem: not a self-signed root (issued by CN=plug-in root)")
            && text.contains("plug-in cacerts layout, are not supported"),
        "{text}"
    );
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn concurrent_first_starts_agree_on_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = Arc::new(dir.path().join("ca"));
    let starts = 8;
    let barrier = Arc::new(Barrier::new(starts));
    let roots: Vec<_> = (0..starts)
        .map(|_| {
            let (ca_dir, barrier) = (ca_dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                CaRoot::load_or_generate(&ca_dir, "cluster.local", CertTtl::default())
                    .map(|root| root.root())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|start| start.join().unwrap().unwrap())
        .collect();
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "the starts signed with different roots"
    );
    // And the key on disk is that root's.
    let loaded = CaRoot::load_or_generate(&ca_dir, "cluster.local", CertTtl::default()).unwrap();
    assert_eq!(loaded.root(), roots[0]);
}

/// A certificate without its key is never a moment of generation: the error says
/// what is missing without taking the lock, so a read-only directory (a Secret
/// mount) gets that message rather than a failure to create the lock file.
#[test]
fn a_certificate_without_its_key_is_reported_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let root = CaRoot::generate("cluster.local", CertTtl::default()).unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), root.root_pem()).unwrap();
    let err =
        CaRoot::load_or_generate(dir.path(), "cluster.local", CertTtl::default()).unwrap_err();
    assert!(matches!(err, RootError::Incomplete { .. }), "{err}");
    assert!(!dir.path().join(LOCK_FILE).exists(), "the lock was taken");
}
