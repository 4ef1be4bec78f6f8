//! Embedded-mode authentication: a token file of `<node> <token>` lines (`#`
//! comments and blank lines allowed). The file is re-read when it changes (checked
//! at each use), tokens are compared in constant time, and a file that turns bad
//! is reported while the last good tokens stay in force.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::{AuthError, Authenticator, Caller};

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("token file {} line {line}: {problem}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// One node's token, kept as a digest: comparing digests takes the same time
/// whatever the token's length and wherever it differs.
#[derive(Clone)]
struct Entry {
    node: String,
    digest: [u8; 32],
}

/// What identifies a version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct Loaded {
    stamp: Stamp,
    entries: Arc<Vec<Entry>>,
}

/// Node tokens from a file, re-read when the file changes.
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for TokenFile {
    // Never prints tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenFile {
    /// Reads the file now: a missing or malformed file fails at start.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, TokenFileError> {
        let path = path.into();
        let stamp = stamp_of(&path)?;
        let entries = read_entries(&path)?;
        Ok(Self {
            path,
            loaded: Mutex::new(Loaded {
                stamp,
                entries: Arc::new(entries),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current tokens, re-read first if the file changed. A file that cannot
    /// be read or parsed now is logged and the last good tokens are kept.
    fn current(&self) -> Arc<Vec<Entry>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = match stamp_of(&self.path) {
            Ok(stamp) => stamp,
            Err(error) => {
                tracing::warn!(%error, "keeping the last good node tokens");
                return loaded.entries.clone();
            }
        };
        if stamp != loaded.stamp {
            // Remember the stamp either way: a bad file is reported once, not per call.
            loaded.stamp = stamp;
            match read_entries(&self.path) {
                Ok(entries) => {
                    tracing::info!(path = %self.path.display(), nodes = entries.len(), "node tokens reloaded");
                    loaded.entries = Arc::new(entries);
                }
                Err(error) => tracing::error!(%error, "keeping the last good node tokens"),
            }
        }
        loaded.entries.clone()
    }
}

impl Authenticator for TokenFile {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let entries = self.current();
        // Every entry is compared, without an early exit.
        let mut found: Option<&Entry> = None;
        for entry in entries.iter() {
            if digests_equal(&entry.digest, &digest) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or_else(|| AuthError::Invalid("unknown node token".into()))?;
        Ok(Caller {
            node: entry.node.clone(),
            principal: format!("node-token:{}", entry.node),
        })
    }
}

/// Constant-time equality of two digests.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TokenFileError + '_ {
    move |source| TokenFileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn stamp_of(path: &Path) -> Result<Stamp, TokenFileError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).map_err(io_err(path))?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

fn read_entries(path: &Path) -> Result<Vec<Entry>, TokenFileError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    parse(&text).map_err(|(line, problem)| TokenFileError::Malformed {
        path: path.to_owned(),
        line,
        problem,
    })
}

/// Parses the file's text; an error names the 1-based line.
fn parse(text: &str) -> Result<Vec<Entry>, (usize, String)> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [node, token] = fields.as_slice() else {
            return Err((
                number,
                format!(
                    "expected `<node> <token>`, found {} field{}",
                    fields.len(),
                    if fields.len() == 1 { "" } else { "s" }
                ),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(other) = entries.iter().find(|e| e.digest == digest) {
            return Err((
                number,
                format!("this token is already the token of node {}", other.node),
            ));
        }
        entries.push(Entry {
            node: (*node).to_owned(),
            digest,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[tokio::test]
    async fn tokens_map_to_their_nodes() {
        let file = file_with("# nodes\n\nnode-a  secret-a\n  node-b\tsecret-b  \n");
        let tokens = TokenFile::load(file.path()).unwrap();
        let caller = tokens.authenticate("secret-b").await.unwrap();
        assert_eq!(
            caller,
            Caller {
                node: "node-b".into(),
                principal: "node-token:node-b".into()
            }
        );
        assert_eq!(
            tokens.authenticate("secret-a").await.unwrap().node,
            "node-a"
        );
        let err = tokens.authenticate("secret-c").await.unwrap_err();
        assert_eq!(err, AuthError::Invalid("unknown node token".into()));
        assert!(tokens.authenticate("").await.is_err());
        assert!(!format!("{tokens:?}").contains("secret"));
    }

    #[test]
    fn a_malformed_line_is_named_by_number() {
        let file = file_with("# ok\nnode-a secret-a\nnode-b\n");
        let err = TokenFile::load(file.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, TokenFileError::Malformed { line: 3, .. }),
            "{text}"
        );
        assert!(
            text.contains("line 3") && text.contains("1 field"),
            "{text}"
        );

        let file = file_with("node-a secret extra\n");
        let err = TokenFile::load(file.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 1: expected `<node> <token>`, found 3 fields"),
            "{err}"
        );

        let file = file_with("node-a same\nnode-b same\n");
        let err = TokenFile::load(file.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2: this token is already the token of node node-a"),
            "{err}"
        );

        let err = TokenFile::load("/nonexistent/tokens").unwrap_err();
        assert!(matches!(err, TokenFileError::Io { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_changed_file_is_reread_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        fs::write(&path, "node-a old\n").unwrap();
        let tokens = TokenFile::load(&path).unwrap();
        assert!(tokens.authenticate("old").await.is_ok());

        // Replaced by rename (a new inode), as editors and Kubernetes do.
        let next = dir.path().join("tokens.new");
        fs::write(&next, "node-a new\n").unwrap();
        fs::rename(&next, &path).unwrap();
        assert!(tokens.authenticate("old").await.is_err());
        assert_eq!(tokens.authenticate("new").await.unwrap().node, "node-a");

        fs::write(&next, "node-a new\nbroken\n").unwrap();
        fs::rename(&next, &path).unwrap();
        assert_eq!(tokens.authenticate("new").await.unwrap().node, "node-a");

        fs::remove_file(&path).unwrap();
        assert_eq!(tokens.authenticate("new").await.unwrap().node, "node-a");
    }

    #[test]
    fn digests_compare_exactly() {
        let a: [u8; 32] = Sha256::digest(b"a").into();
        let b: [u8; 32] = Sha256::digest(b"b").into();
        assert!(digests_equal(&a, &a));
        assert!(!digests_equal(&a, &b));
    }
}
