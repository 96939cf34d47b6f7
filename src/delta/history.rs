//! How long a table's past stays readable. medallion cleans a table's log in one place only,
//! `maintain --vacuum`, by the rule its vacuum keeps files; delta-rs would otherwise delete, after any
//! commit, the log entries older than `delta.logRetentionDuration` (30 days unless set), and with them
//! versions a pipeline promises for longer (`time_travel_days`, `backfill_days`).
//!
//! So medallion's commits never clean the log ([`no_log_cleanup`]), its tables turn that cleanup off
//! for every writer (`delta.enableExpiredLogCleanup`), and their retention properties, which other
//! tools' vacuum and log cleanup honour, cover the pipeline's window ([`properties`]).

use std::{collections::HashMap, time::Duration};

use deltalake::{
    DeltaTable, ObjectMeta, TableProperty, kernel::transaction::CommitProperties,
    table::config::TablePropertiesExt,
};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::DeltaError;
use crate::storage::Location;

/// How long Delta keeps a table's log unless told otherwise, in days.
const DELTA_LOG_DAYS: u32 = 30;

/// How long Delta's vacuum keeps removed files unless told otherwise, in days.
const DELTA_DELETED_FILE_DAYS: u32 = 7;

/// The properties a table gets so that every Delta tool keeps `days` of its history: no log cleanup
/// after commits, and with `days`, the log kept for at least `days` (never less than Delta's 30) and
/// removed files for at least `days` (never less than Delta's 7).
pub fn properties(days: Option<u32>) -> Vec<(TableProperty, String)> {
    let mut properties = vec![(TableProperty::EnableExpiredLogCleanup, "false".to_string())];
    if let Some(days) = days {
        properties.push((
            TableProperty::LogRetentionDuration,
            interval(days.max(DELTA_LOG_DAYS)),
        ));
        properties.push((
            TableProperty::DeletedFileRetentionDuration,
            interval(days.max(DELTA_DELETED_FILE_DAYS)),
        ));
    }
    properties
}

fn interval(days: u32) -> String {
    format!("interval {days} days")
}

fn days(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 24 * 3600)
}

/// Commit properties that keep delta-rs from cleaning the log after the commit, whatever the table
/// says: a table created before medallion set its properties still keeps its history.
pub fn no_log_cleanup(properties: CommitProperties) -> CommitProperties {
    properties.with_cleanup_expired_logs(Some(false))
}

/// Sets on `table` the [`properties`] for `days` that it lacks or holds lower (a table created by
/// an older medallion, or lowered by another tool), in one commit; never lowers one. Returns the
/// table after the commit, or `None` when nothing was missing.
pub async fn keep(
    path: &Location,
    table: &DeltaTable,
    days: u32,
) -> Result<Option<DeltaTable>, DeltaError> {
    let config = table
        .snapshot()
        .map_err(|e| DeltaError::table(path, e))?
        .table_config();
    let missing: HashMap<String, String> = properties(Some(days))
        .into_iter()
        .filter(|(property, _)| match property {
            TableProperty::EnableExpiredLogCleanup => config.enable_expired_log_cleanup(),
            TableProperty::LogRetentionDuration => {
                config.log_retention_duration() < self::days(days)
            }
            TableProperty::DeletedFileRetentionDuration => {
                config.deleted_file_retention_duration() < self::days(days)
            }
            _ => false,
        })
        .map(|(property, value)| (property.as_ref().to_string(), value))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    table
        .clone()
        .set_tbl_properties()
        .with_properties(missing)
        .with_commit_properties(no_log_cleanup(CommitProperties::default()))
        .await
        .map(Some)
        .map_err(|e| DeltaError::table(path, e))
}

/// The entries of `table`'s log that no version current at or after `start` needs, nor any within
/// the table's own `delta.logRetentionDuration` (Delta's 30 days unless set), oldest first: the
/// version current at the earlier of the two (the one before the oldest committed since, by the
/// commits' file times, as vacuum and `--as-of` find versions) is read from the newest checkpoint at
/// or before it, so every entry before that checkpoint can go. Nothing goes without such a
/// checkpoint. Every kept version stays readable, and the log is left without holes.
pub async fn expired_log_entries(
    path: &Location,
    table: &DeltaTable,
    start: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Path>, DeltaError> {
    let retention = table
        .snapshot()
        .map_err(|e| DeltaError::table(path, e))?
        .table_config()
        .log_retention_duration();
    // A retention longer than any date can say keeps everything.
    let Some(cutoff) = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|kept| chrono::Utc::now().checked_sub_signed(kept))
        .map(|logged| logged.min(start))
    else {
        return Ok(Vec::new());
    };
    let mut logged = log_entries(path, table).await?;
    let commits = || {
        logged
            .iter()
            .filter(|(entry, _)| entry.kind == Kind::Commit)
    };
    let first_since = commits()
        .filter(|(_, meta)| meta.last_modified > cutoff)
        .map(|(entry, _)| entry.version)
        .min();
    let current_then = match first_since {
        Some(first) => first.checked_sub(1),
        None => commits().map(|(entry, _)| entry.version).max(),
    };
    let Some(checkpoint) = current_then.and_then(|then| {
        logged
            .iter()
            .filter(|(entry, _)| entry.kind == Kind::Checkpoint && entry.version <= then)
            .map(|(entry, _)| entry.version)
            .max()
    }) else {
        return Ok(Vec::new());
    };
    logged.retain(|(entry, _)| entry.version < checkpoint);
    logged.sort_by_key(|(entry, _)| entry.version);
    Ok(logged.into_iter().map(|(_, meta)| meta.location).collect())
}

/// The files of `table`'s log named by a version, with their listing.
async fn log_entries(
    path: &Location,
    table: &DeltaTable,
) -> Result<Vec<(LogEntry, ObjectMeta)>, DeltaError> {
    let entries: Vec<ObjectMeta> = table
        .object_store()
        .list(Some(&Path::from("_delta_log")))
        .try_collect()
        .await
        .map_err(|e| DeltaError::table(path, e.into()))?;
    // Files in folders under the log (another writer's uncommitted transactions) are not entries.
    Ok(entries
        .into_iter()
        .filter(|meta| meta.location.parts().count() == 2)
        .filter_map(|meta| Some((LogEntry::parse(meta.location.filename()?)?, meta)))
        .collect())
}

/// The oldest version `table`'s log still holds, and when it was committed: version 0 while its log
/// entry is there, else the oldest checkpoint (the log before it was cleaned). `None` when neither
/// is found. (A version the log holds may have lost its files to vacuum, which keeps them for the
/// vacuum's retention only.)
pub async fn log_start(
    path: &Location,
    table: &DeltaTable,
) -> Result<Option<(u64, chrono::DateTime<chrono::Utc>)>, DeltaError> {
    let logged = log_entries(path, table).await?;
    let commit_time = |version: u64| {
        logged
            .iter()
            .find(|(entry, _)| entry.kind == Kind::Commit && entry.version == version)
            .map(|(_, meta)| meta.last_modified)
    };
    if let Some(first) = commit_time(0) {
        return Ok(Some((0, first)));
    }
    Ok(logged
        .iter()
        .filter(|(entry, _)| entry.kind == Kind::Checkpoint)
        .map(|(entry, _)| entry.version)
        .min()
        .and_then(|version| Some((version, commit_time(version)?))))
}

/// Deletes `entries` (from [`expired_log_entries`]) from `table`'s log, one at a time in their
/// order (oldest first), so that a failure part way leaves a log whose versions follow on.
pub async fn delete_log_entries(
    path: &Location,
    table: &DeltaTable,
    entries: Vec<Path>,
) -> Result<(), DeltaError> {
    let store = table.object_store();
    for entry in entries {
        match store.delete(&entry).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(DeltaError::table(path, error.into())),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Commit,
    /// A checkpoint in one file, as delta-rs writes them: whole whenever it is listed.
    Checkpoint,
    /// Checksums (`.crc`), log compactions and the parts of a checkpoint in several files (not
    /// relied on, as a part may be missing): needed by no reader of a later version.
    Other,
}

/// A file of `_delta_log` named by a version: `<version>.json`, `<version>.checkpoint.parquet`,
/// `<version>.checkpoint.<part>.<parts>.parquet`, `<version>.crc`, or `<from>.<to>.compacted.json`
/// (known by its last version). `_last_checkpoint`, a v2 checkpoint (named by a UUID, with sidecar
/// files of its own) and anything else is not one, and is never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogEntry {
    version: u64,
    kind: Kind,
}

impl LogEntry {
    fn parse(name: &str) -> Option<LogEntry> {
        let version = |part: &str| {
            (part.len() == 20 && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
        };
        let mut parts = name.split('.');
        let first = version(parts.next()?)?;
        let rest: Vec<&str> = parts.collect();
        match rest.as_slice() {
            ["json"] => Some(LogEntry {
                version: first,
                kind: Kind::Commit,
            }),
            ["checkpoint", "parquet"] => Some(LogEntry {
                version: first,
                kind: Kind::Checkpoint,
            }),
            ["checkpoint", part, parts, "parquet"]
                if [part, parts]
                    .iter()
                    .all(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit())) =>
            {
                Some(LogEntry {
                    version: first,
                    kind: Kind::Other,
                })
            }
            ["crc"] => Some(LogEntry {
                version: first,
                kind: Kind::Other,
            }),
            [last, "compacted", "json"] => Some(LogEntry {
                version: version(last)?,
                kind: Kind::Other,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, LogEntry};

    #[test]
    fn log_file_names_are_told_apart_and_others_are_left_alone() {
        let entry = |name| LogEntry::parse(name).map(|e| (e.version, e.kind));
        assert_eq!(entry("00000000000000000007.json"), Some((7, Kind::Commit)));
        assert_eq!(
            entry("00000000000000000020.checkpoint.parquet"),
            Some((20, Kind::Checkpoint))
        );
        assert_eq!(
            entry("00000000000000000020.checkpoint.0000000001.0000000002.parquet"),
            Some((20, Kind::Other))
        );
        assert_eq!(entry("00000000000000000020.crc"), Some((20, Kind::Other)));
        assert_eq!(
            entry("00000000000000000004.00000000000000000009.compacted.json"),
            Some((9, Kind::Other))
        );
        for other in [
            "_last_checkpoint",
            "00000000000000000020.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.json",
            "00000000000000000020.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.parquet",
            "00000000000000000007.json.tmp",
            "0000007.json",
            "_commits",
            ".00000000000000000007.json.crc",
        ] {
            assert_eq!(entry(other), None, "{other}");
        }
    }
}
