//! Ownership checks on the ring folder and files (issue 12, item 2: folder squatting).
//!
//! `/dev/shm` is world-writable (sticky) and emptied at boot: any local user can create
//! `/dev/shm/unid` before the agent starts and put a forged ring in it. So:
//!
//! * the agent ([`secure_dir_for_agent`]) creates the folder itself (mode 0700, or 0750 with a
//!   group), and refuses an existing one that is a symlink, not a directory, not owned by its
//!   effective uid, or writable by group or others;
//! * a consumer ([`check_dir`], [`check_file`]) maps a ring only if the folder passes the same
//!   test for an owner it trusts (its own euid, root, or a configured agent uid) and the file,
//!   opened with `O_NOFOLLOW` and checked with `fstat` on the open descriptor, is a regular file
//!   of a trusted owner that others cannot write;
//! * both check every ancestor of the folder: owned by root or a trusted uid, and not writable
//!   by group or others unless sticky (like `/dev/shm` and `/tmp`), so nobody else can rename
//!   the folder away and put their own in its place.

use crate::error::RingError;
use std::fs::Metadata;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

const S_ISVTX: u32 = 0o1000;

fn insecure(path: &Path, reason: String) -> RingError {
    RingError::Insecure {
        path: path.to_path_buf(),
        reason,
    }
}

fn lstat(path: &Path) -> Result<Metadata, RingError> {
    std::fs::symlink_metadata(path).map_err(|source| RingError::Io {
        op: "lstat",
        path: path.to_path_buf(),
        source,
    })
}

fn owner_ok(uid: u32, owners: &[u32]) -> bool {
    uid == 0 || owners.contains(&uid)
}

/// Every ancestor of `dir` (real path, symlinks resolved) is owned by root or a trusted uid and,
/// if group or others may write it, sticky. Symlinks on the way must be trusted-owned too.
fn check_ancestors(dir: &Path, owners: &[u32]) -> Result<(), RingError> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| RingError::Io {
                op: "getcwd",
                path: dir.to_path_buf(),
                source,
            })?
            .join(dir)
    };
    // The literal path: a symlink component must belong to a trusted owner.
    let mut literal = PathBuf::new();
    let parent = abs.parent().unwrap_or(Path::new("/"));
    for c in parent.components() {
        literal.push(c);
        let m = lstat(&literal)?;
        if m.file_type().is_symlink() && !owner_ok(m.uid(), owners) {
            return Err(insecure(
                &literal,
                format!(
                    "a symlink owned by uid {} leads to the ring folder",
                    m.uid()
                ),
            ));
        }
    }
    // The real path: each directory trusted-owned and not writable by others unless sticky.
    let real = std::fs::canonicalize(parent).map_err(|source| RingError::Io {
        op: "realpath",
        path: parent.to_path_buf(),
        source,
    })?;
    let mut p = PathBuf::new();
    for c in real.components() {
        p.push(c);
        let m = lstat(&p)?;
        if !owner_ok(m.uid(), owners) {
            return Err(insecure(
                &p,
                format!(
                    "a folder above the rings is owned by uid {}, not root or a trusted uid",
                    m.uid()
                ),
            ));
        }
        let mode = m.permissions().mode();
        if mode & 0o022 != 0 && mode & S_ISVTX == 0 {
            return Err(insecure(
                &p,
                format!(
                    "a folder above the rings is writable by others and not sticky (mode {:o})",
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// The ring folder itself: a directory (not a symlink) of a trusted owner that neither group
/// nor others may write.
fn check_dir_itself(dir: &Path, owners: &[u32]) -> Result<(), RingError> {
    let m = lstat(dir)?;
    if m.file_type().is_symlink() {
        return Err(insecure(dir, "the ring folder is a symlink".to_owned()));
    }
    if !m.is_dir() {
        return Err(insecure(dir, "the ring folder is not a folder".to_owned()));
    }
    if !owners.contains(&m.uid()) {
        return Err(insecure(
            dir,
            format!(
                "the ring folder is owned by uid {}, expected {}",
                m.uid(),
                show(owners)
            ),
        ));
    }
    let mode = m.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(insecure(
            dir,
            format!(
                "the ring folder is writable by group or others (mode {:o})",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn show(owners: &[u32]) -> String {
    let v: Vec<String> = owners.iter().map(|u| format!("uid {u}")).collect();
    v.join(" or ")
}

/// Consumer side: whether `dir` may be trusted to hold rings of one of `owners` (root is always
/// trusted for the ancestors; for the folder itself only if listed).
pub fn check_dir(dir: &Path, owners: &[u32]) -> Result<(), RingError> {
    check_dir_itself(dir, owners)?;
    check_ancestors(dir, owners)
}

/// Consumer side: an opened ring (or seal) file is a regular file of one of `owners` that
/// others cannot write. `meta` comes from `fstat` on the open descriptor.
pub fn check_file(path: &Path, meta: &Metadata, owners: &[u32]) -> Result<(), RingError> {
    if !meta.file_type().is_file() {
        return Err(insecure(path, "not a regular file".to_owned()));
    }
    if !owners.contains(&meta.uid()) {
        return Err(insecure(
            path,
            format!(
                "the ring file is owned by uid {}, expected {}",
                meta.uid(),
                show(owners)
            ),
        ));
    }
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(insecure(
            path,
            "the ring file is writable by others".to_owned(),
        ));
    }
    Ok(())
}

/// Agent side: creates `dir` (mode 0700, or 0750 and group `group` when consumers of that
/// group may map the rings) if it is missing, then checks it is ours and safe.
pub fn secure_dir_for_agent(
    dir: &Path,
    group: Option<u32>,
    group_access: bool,
) -> Result<(), RingError> {
    let me = [euid()];
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| RingError::Io {
                    op: "create_dir",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let mode = if group_access { 0o750 } else { 0o700 };
            match std::fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {
                    // The umask may have cleared bits: set them exactly.
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(
                        |source| RingError::Io {
                            op: "chmod",
                            path: dir.to_path_buf(),
                            source,
                        },
                    )?;
                    if let Some(gid) = group {
                        std::os::unix::fs::lchown(dir, None, Some(gid)).map_err(|source| {
                            RingError::Io {
                                op: "chown",
                                path: dir.to_path_buf(),
                                source,
                            }
                        })?;
                    }
                }
                // Made by someone else meanwhile: the checks below judge it.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(RingError::Io {
                        op: "create_dir",
                        path: dir.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Err(source) => {
            return Err(RingError::Io {
                op: "lstat",
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    check_dir_itself(dir, &me)?;
    check_ancestors(dir, &me)
}
