//! One run at a time per pipeline and lake: `<lake>/_medallion/locks/<pipeline>.lock`, created
//! exclusively, holding the owner's pid, host and start time. A second run waits up to its timeout, then
//! gives up with [`LockError::Held`] (exit code 4). A lock whose owner process is gone (same host, pid no
//! longer alive, e.g. after SIGKILL) is stale and is broken safely: it is renamed away atomically, so two
//! waiters cannot both break it, and the breaker then competes for a fresh lock like anyone else.
//!
//! On object storage the lock is an object created with a conditional PUT (`If-None-Match: *`), so only
//! one run's create succeeds; a stale lock (same host, owner gone) is deleted and competed for again. A
//! lock left by a process on another host cannot be judged from here: delete the object named in the
//! error once that run is known to be dead.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, path::Path as ObjectPath};

use crate::storage::{Location, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another run of pipeline `{pipeline}` holds the lock `{path}` ({owner}); waited {waited:?}. \
         Retry later, or raise `--lock-timeout`"
    )]
    Held {
        pipeline: String,
        path: Location,
        owner: String,
        waited: Duration,
    },
    #[error("cannot use the run lock `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the run lock: {0}")]
    Storage(StorageError),
}

/// Held while a run lasts; [`RunLock::release`] removes it (dropping it does too, as a fallback).
pub struct RunLock {
    held: Held,
}

enum Held {
    File(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
    },
    Released,
}

impl std::fmt::Debug for RunLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held {
            Held::File(path) => write!(f, "RunLock({})", path.display()),
            Held::Object { path, .. } => write!(f, "RunLock({path})"),
            Held::Released => write!(f, "RunLock(released)"),
        }
    }
}

impl RunLock {
    pub async fn release(mut self) {
        match std::mem::replace(&mut self.held, Held::Released) {
            Held::File(path) => {
                let _ = std::fs::remove_file(path);
            }
            Held::Object { store, path } => {
                if let Err(error) = store.delete(&path).await {
                    tracing::warn!(lock = %path, "could not remove the run lock: {error}");
                }
            }
            Held::Released => {}
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.held, Held::Released) {
            Held::File(path) => {
                let _ = std::fs::remove_file(path);
            }
            // Best effort on an early return; a lock that stays behind is stale once this process ends.
            Held::Object { store, path } => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { store.delete(&path).await });
                }
            }
            Held::Released => {}
        }
    }
}

/// Takes the run lock of `pipeline` in `lake`, waiting up to `timeout` for another run to finish.
pub async fn acquire(
    lake: &Location,
    pipeline: &str,
    timeout: Duration,
) -> Result<RunLock, LockError> {
    let Some(root) = lake.local_path() else {
        return acquire_object(lake, pipeline, timeout).await;
    };
    let (root, name, shown) = (root.to_path_buf(), pipeline.to_string(), lake.clone());
    tokio::task::spawn_blocking(move || acquire_file(&root, &shown, &name, timeout))
        .await
        .map_err(|e| LockError::Io {
            path: PathBuf::from("-"),
            source: std::io::Error::other(e),
        })?
}

fn owner_line() -> String {
    format!(
        "{} {} {}\n",
        std::process::id(),
        host(),
        chrono::Utc::now().to_rfc3339()
    )
}

fn held(pipeline: &str, path: Location, owner: &str, waited: Duration) -> LockError {
    let mut parts = owner.split_whitespace();
    let described = match (parts.next(), parts.next(), parts.next()) {
        (Some(pid), Some(host), Some(since)) => format!("pid {pid} on {host} since {since}"),
        _ => "owner unknown".into(),
    };
    LockError::Held {
        pipeline: pipeline.to_string(),
        path,
        owner: described,
        waited,
    }
}

async fn acquire_object(
    lake: &Location,
    pipeline: &str,
    timeout: Duration,
) -> Result<RunLock, LockError> {
    let shown = lake.join(format!("_medallion/locks/{pipeline}.lock"));
    let store = lake.store().map_err(LockError::Storage)?;
    let path = ObjectPath::from(format!("_medallion/locks/{pipeline}.lock"));
    let clock = Instant::now();
    loop {
        let create = PutOptions::from(PutMode::Create);
        match store
            .put_opts(&path, owner_line().into_bytes().into(), create)
            .await
        {
            Ok(_) => {
                return Ok(RunLock {
                    held: Held::Object { store, path },
                });
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                let (owner, version) = match store.get(&path).await {
                    Ok(found) => {
                        let version = object_store::UpdateVersion {
                            e_tag: found.meta.e_tag.clone(),
                            version: found.meta.version.clone(),
                        };
                        let owner = found
                            .bytes()
                            .await
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default();
                        (owner, version)
                    }
                    // Released between our create and this read: try again at once.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(LockError::Storage(shown.error(&e))),
                };
                if is_stale(&owner) {
                    // Taken over only if it is still the stale owner's lock: of several waiters that
                    // judged it stale, one replaces it and the others see the new owner.
                    let take_over = PutOptions::from(PutMode::Update(version));
                    match store
                        .put_opts(&path, owner_line().into_bytes().into(), take_over)
                        .await
                    {
                        Ok(_) => {
                            tracing::warn!(owner = %owner.trim(), "broke a stale run lock");
                            return Ok(RunLock {
                                held: Held::Object { store, path },
                            });
                        }
                        Err(
                            object_store::Error::Precondition { .. }
                            | object_store::Error::NotFound { .. },
                        ) => continue,
                        Err(e) => return Err(LockError::Storage(shown.error(&e))),
                    }
                }
                if clock.elapsed() >= timeout {
                    return Err(held(pipeline, shown, &owner, clock.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // A store without conditional writes, which the user accepted (`allow_unsafe_writes`): the lock
            // is written plainly and excludes nothing, as the preflight warned.
            Err(object_store::Error::NotImplemented { .. })
                if lake.storage().allow_unsafe_writes =>
            {
                store
                    .put(&path, owner_line().into_bytes().into())
                    .await
                    .map_err(|e| LockError::Storage(shown.error(&e)))?;
                return Ok(RunLock {
                    held: Held::Object { store, path },
                });
            }
            Err(e) => return Err(LockError::Storage(shown.error(&e))),
        }
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether the process that wrote `owner` (`pid host started`) is certainly gone.
fn is_stale(owner: &str) -> bool {
    let mut parts = owner.split_whitespace();
    let (Some(pid), Some(owner_host)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    // Another host's process cannot be checked from here: never stale; nor can anything without /proc.
    let here = host();
    here != "unknown"
        && owner_host == here
        && Path::new("/proc/self").exists()
        && !Path::new(&format!("/proc/{pid}")).exists()
}

fn acquire_file(
    lake: &Path,
    shown: &Location,
    pipeline: &str,
    timeout: Duration,
) -> Result<RunLock, LockError> {
    let dir = lake.join("_medallion").join("locks");
    let path = dir.join(format!("{pipeline}.lock"));
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let clock = Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(owner_line().as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                return Ok(RunLock {
                    held: Held::File(path),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                if is_stale(&owner) {
                    let aside = dir.join(format!(
                        "{pipeline}.lock.stale-{}-{}",
                        std::process::id(),
                        clock.elapsed().as_nanos()
                    ));
                    // Only one breaker's rename succeeds; the others see the new lock next time.
                    if std::fs::rename(&path, &aside).is_ok() {
                        tracing::warn!(owner = %owner.trim(), "broke a stale run lock");
                        let _ = std::fs::remove_file(&aside);
                    }
                    continue;
                }
                if clock.elapsed() >= timeout {
                    let shown = shown.join(format!("_medallion/locks/{pipeline}.lock"));
                    return Err(held(pipeline, shown, &owner, clock.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn second_acquire_fails_and_a_dead_owner_is_broken() {
        let lake = tempfile::tempdir().unwrap();
        let location = Location::local(lake.path());
        let first = acquire(&location, "p", Duration::ZERO).await.unwrap();
        let second = acquire(&location, "p", Duration::from_millis(300)).await;
        assert!(matches!(second, Err(LockError::Held { .. })), "{second:?}");
        first.release().await;
        let third = acquire(&location, "p", Duration::ZERO).await.unwrap();
        // A lock left by a process that no longer exists (pid beyond pid_max) is broken.
        drop(third);
        let path = lake.path().join("_medallion/locks/p.lock");
        std::fs::write(&path, format!("4194305 {} 2026-01-01T00:00:00Z\n", host())).unwrap();
        let fourth = acquire(&location, "p", Duration::ZERO).await;
        assert!(fourth.is_ok(), "{fourth:?}");
    }
}
