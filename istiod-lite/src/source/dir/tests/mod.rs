//! Unit tests of parsing and of the scan state (the watch loop is tested in
//! `tests/dir_source.rs`), with the helpers they share.

mod bad_input;
mod parse;
mod rename;
mod scan;
mod yaml;

use std::fs;

use super::state::{Delta, DirState};
use crate::model::{ObjectChange, ObjectKey};

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

fn sa(name: &str) -> String {
    format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop}}\n")
}

/// Two scans: the first sees the new stats, the second reads what kept them.
fn settle(state: &mut DirState) -> Delta {
    let first = state.scan();
    assert!(first.changes.is_empty(), "read before settling: {first:?}");
    let second = state.scan();
    assert!(second.pending.is_empty(), "{second:?}");
    second
}

/// Truncates `file` in place (same inode), as `>` in a shell or an editor that
/// rewrites without renaming does.
fn rewrite_in_place(file: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn deletes(delta: &Delta) -> Vec<&ObjectKey> {
    delta
        .changes
        .iter()
        .filter_map(|c| match c {
            ObjectChange::Delete(k) => Some(k),
            ObjectChange::Upsert(_) => None,
        })
        .collect()
}
