//! Listing the watched directory: every `.yaml`/`.yml` file below it with the
//! metadata that tells whether it changed, skipping hidden and editor files.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Deep enough for any sane layout; stops a runaway tree from being walked forever.
const MAX_DEPTH: usize = 32;

/// What says a file may have changed: cheap to read, compared on every poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stat {
    pub len: u64,
    pub modified: Option<SystemTime>,
    /// Editors that save by renaming a new file over the old one change this.
    pub inode: u64,
}

impl Stat {
    /// The stat of the file at `path` (following a symlink).
    pub fn read(path: &Path) -> io::Result<Self> {
        fs::metadata(path).map(|meta| Self::of(&meta))
    }

    fn of(meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        }
    }
}

/// One poll's view of the directory.
#[derive(Debug, Default)]
pub(super) struct Listing {
    pub files: BTreeMap<PathBuf, Stat>,
    /// Directories that could not be read: what was known below them is kept.
    pub unreadable: Vec<(PathBuf, io::Error)>,
}

impl Listing {
    /// True when `path` lies below a directory this listing could not read.
    pub fn hides(&self, path: &Path) -> bool {
        self.unreadable.iter().any(|(dir, _)| path.starts_with(dir))
    }
}

/// Lists every root recursively into one listing (a file below two overlapping
/// roots is listed once).
pub(super) fn list_all(roots: &[PathBuf]) -> Listing {
    let mut listing = Listing::default();
    for root in roots {
        visit(root, 0, &mut listing);
    }
    listing
}

fn visit(dir: &Path, depth: usize, listing: &mut Listing) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            listing.unreadable.push((dir.to_owned(), e));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                listing.unreadable.push((dir.to_owned(), e));
                return;
            }
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_ignored_name(name) {
            continue;
        }
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            if depth < MAX_DEPTH {
                visit(&path, depth + 1, listing);
            }
            continue;
        }
        if !is_yaml(name) {
            continue;
        }
        // Follows a symlink to a file; a link to a directory is not walked, so a
        // link cycle cannot be.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                listing.files.insert(path, Stat::of(&meta));
            }
            // Gone between listing and stat, or a dangling link: not there.
            _ => {}
        }
    }
}

/// Hidden files and directories (`.git`, `..data` of a mounted ConfigMap, `.#x`
/// locks) and what editors leave behind (`x~`, `#x#`).
fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('#') || name.ends_with('~')
}

fn is_yaml(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_yaml("a.yaml") && is_yaml("b.YML"));
        assert!(!is_yaml("a.yaml.swp") && !is_yaml("a.json") && !is_yaml("4913"));
        assert!(
            is_ignored_name(".a.yaml") && is_ignored_name("a.yaml~") && is_ignored_name("#a.yaml#")
        );
        assert!(!is_ignored_name("a.yaml"));
    }

    #[test]
    fn lists_recursively_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::create_dir_all(root.join(".hidden")).unwrap();
        for f in [
            "a.yaml",
            "sub/b.yml",
            "sub/deeper/c.yaml",
            ".hidden/d.yaml",
            "e.yaml~",
            "f.txt",
            ".g.yaml",
        ] {
            fs::write(root.join(f), "x: 1").unwrap();
        }
        let listing = list_all(&[root.to_owned()]);
        let names: Vec<_> = listing
            .files
            .keys()
            .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.yaml", "sub/b.yml", "sub/deeper/c.yaml"]);
        assert!(listing.unreadable.is_empty());
        let missing = list_all(&[root.join("nope")]);
        assert_eq!(missing.unreadable.len(), 1);
        assert!(missing.hides(&root.join("nope/x.yaml")));
    }
}
