//! Listing the watched directory: every `.yaml`/`.yml` file below it with the
//! metadata that tells whether it changed, skipping hidden and editor files.
//! Symlinks are followed, to files and to directories (a mounted ConfigMap's
//! `sub -> ..data/sub` for an item path `sub/a.yaml`); a directory reached twice
//! (a link cycle, a second link to it) is walked once.

use std::collections::{BTreeMap, HashSet};
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
    /// Entries whose metadata could not be read for another reason than their
    /// absence (a permission, a link loop, an I/O error): a file or a directory,
    /// what was known of it is kept.
    pub unknown: Vec<(PathBuf, io::Error)>,
}

impl Listing {
    /// True when `path` is, or lies below, an entry this listing could not read.
    pub fn hides(&self, path: &Path) -> bool {
        self.unreadable
            .iter()
            .chain(&self.unknown)
            .any(|(dir, _)| path.starts_with(dir))
    }
}

/// The error says the entry is not there (then what it held goes): anything
/// else leaves it unknown, not absent.
fn is_absent(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Lists every root recursively into one listing (a file below two overlapping
/// roots is listed once).
pub(super) fn list_all(roots: &[PathBuf]) -> Listing {
    let mut listing = Listing::default();
    let mut walked = HashSet::new();
    for root in roots {
        // A root that cannot be stat'ed is reported by `visit`, when it reads it.
        let first = fs::metadata(root).map_or(true, |meta| walked.insert(dir_id(&meta)));
        if first {
            visit(root, 0, &mut listing, &mut walked);
        }
    }
    listing
}

/// What tells a directory apart, whatever path reaches it.
fn dir_id(meta: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

fn visit(dir: &Path, depth: usize, listing: &mut Listing, walked: &mut HashSet<(u64, u64)>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Below the root, a directory removed since it was listed is just gone.
        Err(e) if depth > 0 && is_absent(&e) => return,
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
        let file_type = match entry.file_type() {
            Ok(file_type) => file_type,
            Err(e) if is_absent(&e) => continue,
            Err(e) => {
                listing.unknown.push((path, e));
                continue;
            }
        };
        if !(file_type.is_dir() || file_type.is_symlink() || is_yaml(name)) {
            continue;
        }
        // Follows a symlink.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                let walk = depth < MAX_DEPTH && walked.insert(dir_id(&meta));
                if walk {
                    visit(&path, depth + 1, listing, walked);
                }
            }
            Ok(meta) if meta.is_file() && is_yaml(name) => {
                listing.files.insert(path, Stat::of(&meta));
            }
            Ok(_) => {}
            // Gone between listing and stat, or a dangling link: not there.
            Err(e) if is_absent(&e) => {}
            Err(e) => listing.unknown.push((path, e)),
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

    /// Relative paths below `root`, in order.
    fn relative(listing: &Listing, root: &Path) -> Vec<String> {
        listing
            .files
            .keys()
            .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_owned())
            .collect()
    }

    /// A ConfigMap mounted by the kubelet (AtomicWriter) with items `top.yaml`
    /// and `sub/a.yaml`: the items live in a hidden timestamped directory,
    /// reached through `..data` and one symlink per top-level name.
    #[test]
    fn follows_a_mounted_config_maps_links_to_directories() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("..2026_01_01_00_00_00.1/sub")).unwrap();
        fs::write(root.join("..2026_01_01_00_00_00.1/sub/a.yaml"), "x: 1").unwrap();
        fs::write(root.join("..2026_01_01_00_00_00.1/top.yaml"), "x: 1").unwrap();
        symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
        symlink("..data/sub", root.join("sub")).unwrap();
        symlink("..data/top.yaml", root.join("top.yaml")).unwrap();
        let listing = list_all(&[root.to_owned()]);
        assert_eq!(relative(&listing, root), ["sub/a.yaml", "top.yaml"]);
        assert!(listing.unreadable.is_empty());

        // Cycles end: a link to the root, to a parent, to itself.
        symlink(".", root.join("again")).unwrap();
        symlink("../..", root.join("..2026_01_01_00_00_00.1/sub/up")).unwrap();
        symlink("self", root.join("self")).unwrap();
        let listing = list_all(&[root.to_owned()]);
        assert_eq!(relative(&listing, root), ["sub/a.yaml", "top.yaml"]);
        // The link to itself cannot be resolved: reported, not taken for absent.
        assert_eq!(listing.unknown.len(), 1, "{:?}", listing.unknown);
        assert_eq!(listing.unknown[0].0, root.join("self"));
        // A root below another one is not listed twice either.
        let listing = list_all(&[root.to_owned(), root.join("sub")]);
        assert_eq!(relative(&listing, root), ["sub/a.yaml", "top.yaml"]);
    }
}
