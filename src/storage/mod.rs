//! Where tables and landing files live: a folder on local disk, or a prefix in an S3 bucket (AWS S3, MinIO
//! or another S3-compatible server). A [`Location`] carries the options to reach it, so the layers above
//! open tables and files the same way wherever they are. This module also owns the check that makes
//! concurrent Delta commits on S3 safe ([`preflight`]) and the translation of object-store failures into
//! errors a user can act on. Option values may hold secrets: nothing here displays them.

mod pieces;
mod remote;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Once, OnceLock},
};

use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, prefix::PrefixStore,
};
use url::Url;

pub use pieces::PieceWriter;
pub use remote::{
    Listed, ReadFailure, RemoteFile, StreamRead, any_under, copy, list, read_all, write_all,
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("`{location}` is not a usable location: {message}")]
    InvalidLocation { location: String, message: String },
    #[error("`{location}`: {problem}")]
    Access { location: String, problem: String },
    #[error(
        "`{location}`: the storage server does not refuse a second create of the same object \
         (conditional PUT with `If-None-Match: *`), so two writers could overwrite each other's Delta \
         commits and lose data. Use AWS S3, MinIO or another server that supports conditional writes; if \
         only one process ever writes to this lake, opt in with `storage: {{ allow_unsafe_writes: true }}`"
    )]
    UnsafeCommits { location: String },
    #[error(
        "`{location}`: `{option}` is set ({why}); medallion commits through S3 conditional writes and \
         refuses this configuration. Remove it, or opt in with `storage: {{ allow_unsafe_writes: true }}`"
    )]
    UnsafeOption {
        location: String,
        option: String,
        why: &'static str,
    },
}

/// How to reach object storage: the pipeline's `storage:` block as options for delta-rs and object_store
/// (`aws_endpoint`, `aws_region`, ...). Credentials normally come from the environment (the AWS chain);
/// values given here may hold secrets and are never displayed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Storage {
    options: BTreeMap<String, String>,
    /// The user accepts commits that concurrent writers could overwrite (a server without conditional
    /// writes, or an unsafe-rename option).
    pub allow_unsafe_writes: bool,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("allow_unsafe_writes", &self.allow_unsafe_writes)
            .finish()
    }
}

impl Storage {
    pub fn new(options: BTreeMap<String, String>, allow_unsafe_writes: bool) -> Storage {
        Storage {
            options,
            allow_unsafe_writes,
        }
    }

    /// Option names (never values), for `validate` and logs.
    pub fn option_names(&self) -> impl Iterator<Item = &str> {
        self.options.keys().map(String::as_str)
    }

    /// Values of options that hold secrets (keys, tokens, passwords), to mask in error text.
    fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.options
            .iter()
            .filter(|(key, value)| {
                let key = key.to_ascii_lowercase();
                !value.is_empty()
                    && [
                        "secret",
                        "token",
                        "password",
                        "key_id",
                        "access_key",
                        "credential",
                    ]
                    .iter()
                    .any(|word| key.contains(word))
            })
            .map(|(_, value)| value.as_str())
    }

    /// Options and the environment merged as delta-rs reads them, for the safety checks.
    fn effective(&self, name: &str) -> Option<String> {
        self.options
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name.to_ascii_uppercase()).ok())
    }
}

/// A folder on local disk or a prefix in an S3 bucket, with the storage options to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct Location {
    /// Shared, so that locations stay small to pass around and to put in errors.
    place: Arc<Place>,
    storage: Arc<Storage>,
}

#[derive(Clone, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    /// `s3://bucket/prefix`, without a trailing slash.
    S3(Url),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.place.as_ref() {
            Place::Local(path) => write!(f, "{}", path.display()),
            Place::S3(url) => write!(f, "{url}"),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Location({self})")
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Location {
        Location::local(path)
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Location {
        Location::local(path)
    }
}

impl From<&Location> for Location {
    fn from(location: &Location) -> Location {
        location.clone()
    }
}

impl Location {
    /// A local folder with default storage options.
    pub fn local(path: impl Into<PathBuf>) -> Location {
        Location {
            place: Arc::new(Place::Local(path.into())),
            storage: Arc::default(),
        }
    }

    /// Parses `s3://bucket/prefix` (also `s3a://`), `file:///absolute/path` or a plain path; a relative
    /// path is taken relative to `base`.
    pub fn parse(text: &str, base: &Path, storage: Arc<Storage>) -> Result<Location, StorageError> {
        // A location with credentials in it is shown without them.
        let shown = match Url::parse(text) {
            Ok(mut url)
                if !url.username().is_empty()
                    || url.password().is_some()
                    || url.query().is_some() =>
            {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            _ => text.to_string(),
        };
        let invalid = |message: String| StorageError::InvalidLocation {
            location: shown.clone(),
            message,
        };
        let place = match text.split_once("://") {
            Some(("s3" | "s3a", _)) => {
                let mut url = Url::parse(text).map_err(|e| invalid(e.to_string()))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(invalid("no bucket name: write `s3://bucket/prefix`".into()));
                }
                if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
                    return Err(invalid(
                        "credentials and query strings do not belong in the location; set them in the \
                         environment (AWS_ACCESS_KEY_ID, ...) or under `storage:`"
                            .into(),
                    ));
                }
                let _ = url.set_scheme("s3");
                let path = url.path().trim_end_matches('/').to_string();
                url.set_path(&path);
                Place::S3(url)
            }
            Some(("file", _)) => {
                let url = Url::parse(text).map_err(|e| invalid(e.to_string()))?;
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid("a file URL needs an absolute path".into()))?;
                Place::Local(path)
            }
            Some((scheme, _)) => {
                return Err(invalid(format!(
                    "`{scheme}://` is not supported; use a local path, `file://` or `s3://bucket/prefix`"
                )));
            }
            None => Place::Local(clean_path(&base.join(text))),
        };
        Ok(Location {
            place: Arc::new(place),
            storage,
        })
    }

    /// The same place reached with other storage options.
    pub fn with_storage(mut self, storage: Arc<Storage>) -> Location {
        self.storage = storage;
        self
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// `part` (one or more `/`-separated segments) under this location.
    pub fn join(&self, part: impl AsRef<str>) -> Location {
        let part = part.as_ref().trim_matches('/');
        let place = match self.place.as_ref() {
            Place::Local(path) => Place::Local(path.join(part)),
            Place::S3(url) => {
                let mut url = url.clone();
                let path = format!("{}/{part}", url.path().trim_end_matches('/'));
                url.set_path(&path);
                Place::S3(url)
            }
        };
        Location {
            place: Arc::new(place),
            storage: self.storage.clone(),
        }
    }

    /// The folder on local disk, or `None` for object storage.
    pub fn local_path(&self) -> Option<&Path> {
        match self.place.as_ref() {
            Place::Local(path) => Some(path),
            Place::S3(_) => None,
        }
    }

    pub fn is_remote(&self) -> bool {
        self.local_path().is_none()
    }

    /// The last segment of the location, e.g. the table's folder name.
    pub fn name(&self) -> Option<String> {
        match self.place.as_ref() {
            Place::Local(path) => path.file_name().map(|n| n.to_string_lossy().into_owned()),
            Place::S3(url) => url
                .path_segments()
                .and_then(|mut s| s.next_back())
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        }
    }

    /// The URL delta-rs opens (`file:///...` for local folders).
    pub fn url(&self) -> Result<Url, StorageError> {
        match self.place.as_ref() {
            Place::Local(path) => {
                let absolute =
                    std::path::absolute(path).map_err(|e| StorageError::InvalidLocation {
                        location: self.to_string(),
                        message: e.to_string(),
                    })?;
                Url::from_directory_path(&absolute).map_err(|()| StorageError::InvalidLocation {
                    location: self.to_string(),
                    message: "not an absolute path".into(),
                })
            }
            Place::S3(url) => Ok(url.clone()),
        }
    }

    /// Storage options in the form delta-rs takes them.
    pub fn delta_options(&self) -> HashMap<String, String> {
        register_handlers();
        self.storage
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// An object store rooted at this location (paths in it are relative to the location). Stores are
    /// cached per bucket and options, so a run builds one HTTP client and resolves credentials once.
    pub fn store(&self) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let Place::S3(url) = self.place.as_ref() else {
            let path = self.local_path().unwrap_or(Path::new("."));
            std::fs::create_dir_all(path).map_err(|e| self.access(e.to_string()))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|e| self.access(e.to_string()))?;
            return Ok(Arc::new(pieces::Pieces::new(Arc::new(local))));
        };
        let root = self.bucket_store(url)?;
        // The URL's path is percent-encoded; the object path is not.
        let prefix = object_store::path::Path::from_url_path(url.path())
            .map_err(|e| self.access(e.to_string()))?;
        if prefix.as_ref().is_empty() {
            return Ok(root);
        }
        Ok(Arc::new(PrefixStore::new(root, prefix)))
    }

    fn bucket_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>, StorageError> {
        type Cache = Mutex<HashMap<(String, BTreeMap<String, String>), Arc<dyn ObjectStore>>>;
        static STORES: OnceLock<Cache> = OnceLock::new();
        let bucket = format!("s3://{}", url.host_str().unwrap_or_default());
        let key = (bucket.clone(), self.storage.options.clone());
        let stores = STORES.get_or_init(Cache::default);
        if let Some(store) = stores.lock().ok().and_then(|s| s.get(&key).cloned()) {
            return Ok(store);
        }
        let bucket_url = Url::parse(&bucket).map_err(|e| self.access(e.to_string()))?;
        let config = deltalake::logstore::StorageConfig::parse_options(self.delta_options())
            .map_err(|e| self.access(format!("invalid storage option: {e}")))?;
        let store = deltalake::logstore::logstore_for(&bucket_url, config)
            .map_err(|e| self.access(explain(&e.to_string(), &self.storage)))?
            .root_object_store(None);
        if let Ok(mut stores) = stores.lock() {
            stores.insert(key, store.clone());
        }
        Ok(store)
    }

    fn access(&self, problem: String) -> StorageError {
        StorageError::Access {
            location: self.to_string(),
            problem,
        }
    }

    /// An error about this location, from an object store failure, in words a user can act on.
    pub fn error(&self, error: &object_store::Error) -> StorageError {
        self.access(explain(&error_chain(error), &self.storage))
    }
}

/// `path` without `.` segments (`./lake` under project `.` reads better as `lake`).
pub(crate) fn clean_path(path: &Path) -> PathBuf {
    let clean: PathBuf = path
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    if clean.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        clean
    }
}

/// Makes `s3://` locations known to delta-rs, and has it open `file://` tables through the local store
/// that writes in pieces ([`pieces::Pieces`]); once per process.
fn register_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        deltalake::aws::register_handlers(None);
        if let Ok(scheme) = Url::parse("file://") {
            deltalake::logstore::object_store_factories().insert(scheme, Arc::new(LocalFactory));
        }
    });
}

/// delta-rs's factory for `file://` tables: what its default factory builds (the local store, on
/// delta-rs's separate IO runtime when the options ask for one), the local store wrapped in
/// [`pieces::Pieces`].
struct LocalFactory;

impl deltalake::logstore::ObjectStoreFactory for LocalFactory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<(
        deltalake::logstore::ObjectStoreRef,
        object_store::path::Path,
    )> {
        let (store, path) = object_store::parse_url_opts(url, &config.raw)?;
        let store: Arc<dyn ObjectStore> = Arc::new(pieces::Pieces::new(Arc::from(store)));
        Ok(match &config.runtime {
            Some(runtime) => (
                Arc::new(deltalake::logstore::DeltaIOStorageBackend::new(
                    store,
                    runtime.clone(),
                )),
                path,
            ),
            None => (store, path),
        })
    }
}

/// An error and its sources, as one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

/// Turns an object-store failure into what happened and what to do. The raw text is kept at the end
/// (it names the request), with option values removed.
pub fn explain(raw: &str, storage: &Storage) -> String {
    let mut raw = compact_xml(raw);
    for value in storage.secret_values() {
        raw = raw.replace(value, "***");
    }
    let has = |needles: &[&str]| needles.iter().any(|n| raw.contains(n));
    let endpoint = storage
        .effective("aws_endpoint")
        .or_else(|| storage.effective("aws_endpoint_url"))
        .unwrap_or_else(|| "the AWS S3 endpoint".into());
    let advice = if has(&[
        "NoSuchBucket",
        "bucket does not exist",
        "The specified bucket",
    ]) {
        "the bucket does not exist: create it, or fix the bucket name in `lake:` / `path:`"
            .to_string()
    } else if has(&[
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "AccessDenied",
        "403 Forbidden",
        "ExpiredToken",
        "lacked the necessary privileges",
    ]) {
        "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and \
         that they allow the actions listed in the README's S3 section"
            .to_string()
    } else if has(&[
        "error sending request",
        "Connection refused",
        "connection refused",
        "dns error",
        "timed out",
        "connect error",
        "tcp connect",
    ]) {
        format!(
            "cannot reach {endpoint}: is the server running and the endpoint right? (retried with backoff; \
             `storage: max_retries` / `retry_timeout_secs` set how long)"
        )
    } else if has(&[
        "SlowDown",
        "503 Service Unavailable",
        "TooManyRequests",
        "429 Too Many Requests",
    ]) {
        "the server kept throttling requests (SlowDown) after the retries with backoff; run again later or \
         raise `storage: max_retries`"
            .to_string()
    } else {
        return raw;
    };
    format!("{advice} ({raw})")
}

/// S3 error bodies are XML documents over several lines; a message keeps their code and text only.
fn compact_xml(raw: &str) -> String {
    let Some(start) = raw.find("<?xml") else {
        return raw.to_string();
    };
    let between = |open: &str, close: &str| {
        let from = raw[start..].find(open)? + start + open.len();
        let to = raw[from..].find(close)? + from;
        Some(raw[from..to].to_string())
    };
    let code = between("<Code>", "</Code>").unwrap_or_default();
    let message = between("<Message>", "</Message>").unwrap_or_default();
    let end = raw[start..]
        .find("</Error>")
        .map_or(raw.len(), |i| start + i + "</Error>".len());
    format!("{}{code}: {message}{}", &raw[..start], &raw[end..])
}

/// What [`preflight`] found about a lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// Whether a second create of one object was refused, i.e. Delta commits are safe with concurrent
    /// writers. Always true on local disk (delta-rs commits there with an atomic create).
    pub conditional_writes: bool,
}

/// Checks, before a run writes anything, that the lake is reachable with the given credentials and that
/// its commits are safe with concurrent writers: unsafe options are refused, and on object storage a probe
/// object is created twice under `_medallion/probe/`, the second create being expected to fail. A server
/// that accepts both (it ignores `If-None-Match: *`) is refused unless the user opted in.
pub async fn preflight(lake: &Location) -> Result<Preflight, StorageError> {
    if !lake.is_remote() {
        return Ok(Preflight {
            conditional_writes: true,
        });
    }
    // Once per lake and process: a backfill runs the pipeline once per date.
    type Checked = Mutex<HashMap<String, Preflight>>;
    static CHECKED: OnceLock<Checked> = OnceLock::new();
    let checked = CHECKED.get_or_init(Checked::default);
    let key = format!("{lake} {:?}", lake.storage);
    if let Some(known) = checked.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(known);
    }
    let found = probe(lake).await?;
    if let Ok(mut checked) = checked.lock() {
        checked.insert(key, found.clone());
    }
    Ok(found)
}

async fn probe(lake: &Location) -> Result<Preflight, StorageError> {
    let storage = &lake.storage;
    if !storage.allow_unsafe_writes {
        type IsUnsafe = fn(&str) -> bool;
        let unsafe_options: [(&str, &'static str, IsUnsafe); 3] = [
            (
                "AWS_S3_ALLOW_UNSAFE_RENAME",
                "commits by copy and delete, which concurrent writers can overwrite",
                truthy,
            ),
            (
                "AWS_S3_LOCKING_PROVIDER",
                "delta-rs 1.x no longer supports a DynamoDB lock; commits would not be protected by it",
                |_| true,
            ),
            (
                "aws_conditional_put",
                "turning conditional puts off lets concurrent commits overwrite each other",
                |v| v.eq_ignore_ascii_case("disabled"),
            ),
        ];
        for (option, why, bad) in unsafe_options {
            if storage.effective(option).is_some_and(|v| bad(&v)) {
                return Err(StorageError::UnsafeOption {
                    location: lake.to_string(),
                    option: option.to_string(),
                    why,
                });
            }
        }
    }
    let store = lake.store()?;
    let probe = object_store::path::Path::from(format!(
        "_medallion/probe/{}",
        uuid::Uuid::new_v4().simple()
    ));
    let create = PutOptions::from(PutMode::Create);
    let conditional_writes = match store
        .put_opts(&probe, PutPayload::from_static(b"probe"), create.clone())
        .await
    {
        Ok(_) => {
            let second = store
                .put_opts(&probe, PutPayload::from_static(b"probe"), create)
                .await;
            let _ = store.delete(&probe).await;
            match second {
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => true,
                Ok(_) => false,
                Err(e) => return Err(lake.error(&e)),
            }
        }
        // Conditional puts turned off in the client (`aws_conditional_put: disabled`, opted in).
        Err(object_store::Error::NotImplemented { .. }) => {
            store
                .put(&probe, PutPayload::from_static(b"probe"))
                .await
                .map_err(|e| lake.error(&e))?;
            let _ = store.delete(&probe).await;
            false
        }
        Err(e) => return Err(lake.error(&e)),
    };
    if !conditional_writes {
        if !storage.allow_unsafe_writes {
            return Err(StorageError::UnsafeCommits {
                location: lake.to_string(),
            });
        }
        tracing::warn!(
            lake = %lake,
            "the storage server ignores conditional writes; running because `allow_unsafe_writes` is set: \
             never run two writers on this lake at once"
        );
    }
    Ok(Preflight { conditional_writes })
}

fn truthy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_locations_join_and_display_without_secrets() {
        let storage = Arc::new(Storage::new(
            BTreeMap::from([("aws_secret_access_key".into(), "hunter22".into())]),
            false,
        ));
        let lake = Location::parse("s3://bucket/lake/", Path::new("/x"), storage).unwrap();
        let table = lake.join("gold").join("daily_kpis");
        assert_eq!(table.to_string(), "s3://bucket/lake/gold/daily_kpis");
        assert_eq!(table.name().as_deref(), Some("daily_kpis"));
        assert!(table.is_remote());
        assert!(!format!("{table:?} {:?}", table.storage()).contains("hunter22"));
        let xml = "PUT failed: 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code>\
                   <Message>The specified bucket does not exist</Message></Error>)";
        assert_eq!(
            explain(xml, table.storage()),
            "the bucket does not exist: create it, or fix the bucket name in `lake:` / `path:` \
             (PUT failed: 404 Not Found: NoSuchBucket: The specified bucket does not exist))"
        );
        let explained = explain("403 Forbidden: key hunter22", table.storage());
        assert!(explained.starts_with("access denied"), "{explained}");
        assert!(!explained.contains("hunter22"));
    }

    #[test]
    fn local_tables_and_files_are_written_in_pieces() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lake = Location::parse(
            &dir.path().to_string_lossy(),
            Path::new("."),
            Arc::new(Storage::default()),
        )?;
        assert!(format!("{:?}", lake.store()?).contains("Pieces"));
        let config = deltalake::logstore::StorageConfig::parse_options(lake.delta_options())?;
        let tables = deltalake::logstore::logstore_for(&lake.url()?, config)?;
        assert!(format!("{:?}", tables.object_store(None)).contains("Pieces"));

        // With delta-rs's IO runtime asked for, the store runs on it and still writes in pieces.
        use deltalake::logstore::ObjectStoreFactory;
        let config = deltalake::logstore::StorageConfig::default()
            .with_io_runtime(deltalake::logstore::IORuntime::default());
        let (store, _) = LocalFactory.parse_url_opts(&lake.url()?, &config)?;
        let layers = format!("{store:?}");
        assert!(
            layers.starts_with("DeltaIOStorageBackend(Pieces"),
            "{layers}"
        );
        Ok(())
    }

    #[test]
    fn local_paths_are_relative_to_the_base_and_urls_are_refused_clearly() {
        let none = Arc::new(Storage::default());
        let lake = Location::parse("./lake", Path::new("proj"), none.clone()).unwrap();
        assert_eq!(lake.local_path(), Some(Path::new("proj/lake")));
        let file = Location::parse("file:///data/lake", Path::new("proj"), none.clone()).unwrap();
        assert_eq!(file.local_path(), Some(Path::new("/data/lake")));
        let err = Location::parse("gs://b/x", Path::new("."), none.clone()).unwrap_err();
        assert!(
            err.to_string().contains("`gs://` is not supported"),
            "{err}"
        );
        let err = Location::parse("s3://key:secret@b/x", Path::new("."), none).unwrap_err();
        assert!(!err.to_string().contains("secret@"), "{err}");
    }
}
