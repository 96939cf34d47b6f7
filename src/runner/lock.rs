//! One run at a time per pipeline and lake: `<lake>/_medallion/locks/<pipeline>.lock`, created
//! exclusively, holding the owner's pid, host and start time. A second run waits up to its timeout, then
//! gives up with [`LockError::Held`] (exit code 4). A lock whose owner process is gone (same host, pid no
//! longer alive, e.g. after SIGKILL) is stale and is broken safely: it is renamed away atomically, so two
//! waiters cannot both break it, and the breaker then competes for a fresh lock like anyone else.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another run of pipeline `{pipeline}` holds the lock `{}` ({owner}); waited {waited:?}. \
         Retry later, or raise `--lock-timeout`",
        path.display()
    )]
    Held {
        pipeline: String,
        path: PathBuf,
        owner: String,
        waited: Duration,
    },
    #[error("cannot use the run lock `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while a run lasts; removes the lock file when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    // Another host's process cannot be checked from here: never stale.
    owner_host == host() && !Path::new(&format!("/proc/{pid}")).exists()
}

pub fn acquire(lake: &Path, pipeline: &str, timeout: Duration) -> Result<RunLock, LockError> {
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
                let owner = format!(
                    "{} {} {}\n",
                    std::process::id(),
                    host(),
                    chrono::Utc::now().to_rfc3339()
                );
                file.write_all(owner.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                return Ok(RunLock { path });
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
                    let mut parts = owner.split_whitespace();
                    let described = match (parts.next(), parts.next(), parts.next()) {
                        (Some(pid), Some(host), Some(since)) => {
                            format!("pid {pid} on {host} since {since}")
                        }
                        _ => "owner unknown".into(),
                    };
                    return Err(LockError::Held {
                        pipeline: pipeline.to_string(),
                        path,
                        owner: described,
                        waited: clock.elapsed(),
                    });
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

    #[test]
    fn second_acquire_fails_and_a_dead_owner_is_broken() {
        let lake = tempfile::tempdir().unwrap();
        let first = acquire(lake.path(), "p", Duration::ZERO).unwrap();
        let second = acquire(lake.path(), "p", Duration::from_millis(300));
        assert!(matches!(second, Err(LockError::Held { .. })), "{second:?}");
        drop(first);
        let third = acquire(lake.path(), "p", Duration::ZERO).unwrap();
        // A lock left by a process that no longer exists (pid beyond pid_max) is broken.
        drop(third);
        let path = lake.path().join("_medallion/locks/p.lock");
        std::fs::write(&path, format!("4194305 {} 2026-01-01T00:00:00Z\n", host())).unwrap();
        let fourth = acquire(lake.path(), "p", Duration::ZERO);
        assert!(fourth.is_ok(), "{fourth:?}");
    }
}
