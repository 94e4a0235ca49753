//! Where checkpoints and lakes live: a local directory, or an object store named by a URL.
//!
//! One parser for every place Weir writes files, so that `--checkpoint-store` and a
//! `parquet` sink's `path` accept the same locations and read credentials the same way:
//! from the store's usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme};

/// An object store that also takes multipart uploads (S3, GCS, Azure, and the in-memory
/// store of tests): a file is written in parts and appears, whole, only when completed.
pub trait RemoteStore: ObjectStore + MultipartStore {}

impl<T: ObjectStore + MultipartStore> RemoteStore for T {}

/// A parsed location.
#[derive(Debug, Clone)]
pub enum Location {
    /// A directory on this machine: a plain path or `file:///path`.
    Local(std::path::PathBuf),
    /// A prefix in an object store.
    Remote {
        store: Arc<dyn RemoteStore>,
        /// The prefix the URL names in the store (for `s3://bucket/a/b`: `a/b`).
        root: Path,
    },
}

/// An object store's failure as Weir's error, by cause: refused (57000: permissions,
/// credentials), out of space (53000), or the store (or the disk under a local one) failing
/// or out of reach (08006). A path the store does not know or cannot take is the caller's
/// to word (22000): it is a fault of the request, not of the store.
pub fn store_error(e: object_store::Error, message: String) -> crate::Error {
    use crate::error::External;
    use object_store::Error as E;
    let kind = match &e {
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => External::Refused,
        E::NotFound { .. } | E::InvalidPath { .. } | E::AlreadyExists { .. } => {
            return crate::Error::Execution(message);
        }
        E::Generic { source, .. } => match source
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
        {
            Some(std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) => {
                External::Resources
            }
            Some(std::io::ErrorKind::PermissionDenied) => External::Refused,
            _ => External::Connection,
        },
        _ => External::Connection,
    };
    crate::Error::external(kind, message)
}

/// Parses `location`; errors are messages for the user, naming what is wrong.
pub fn parse_location(location: &str) -> Result<Location, String> {
    if !location.contains("://") {
        return Ok(Location::Local(location.into()));
    }
    // `file:///abs/dir`, and `file://rel/dir` (not a URL, but what people write) alike.
    if let Some(path) = location.strip_prefix("file://") {
        return Ok(Location::Local(path.into()));
    }
    let url = url::Url::parse(location).map_err(|e| e.to_string())?;
    let (scheme, root) = ObjectStoreScheme::parse(&url).map_err(|_| {
        format!(
            "unsupported scheme {}:// (use a local path, file://, s3://, gs:// or az://)",
            url.scheme()
        )
    })?;
    let store: Arc<dyn RemoteStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(location)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        ObjectStoreScheme::GoogleCloudStorage => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(location)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        ObjectStoreScheme::MicrosoftAzure => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(location)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        _ => {
            return Err(format!(
                "unsupported scheme {}:// (use a local path, file://, s3://, gs:// or az://)",
                url.scheme()
            ));
        }
    };
    Ok(Location::Remote { store, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_classed_by_cause() {
        use crate::Error;
        use crate::error::External;
        let kind = |e: object_store::Error| match store_error(e, "m".into()) {
            Error::External { kind, .. } => Some(kind),
            _ => None,
        };
        let path = || "a/b".to_string();
        assert_eq!(
            kind(object_store::Error::PermissionDenied {
                path: path(),
                source: "no".into()
            }),
            Some(External::Refused)
        );
        assert_eq!(
            kind(object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into()
            }),
            Some(External::Connection)
        );
        assert_eq!(
            kind(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
            }),
            Some(External::Resources)
        );
        assert_eq!(
            kind(object_store::Error::NotFound {
                path: path(),
                source: "gone".into()
            }),
            None
        );
    }

    #[test]
    fn paths_and_file_urls_are_local_and_buckets_are_remote() {
        assert!(
            matches!(parse_location("lake/x"), Ok(Location::Local(p)) if p == std::path::Path::new("lake/x"))
        );
        assert!(
            matches!(parse_location("file:///tmp/lake"), Ok(Location::Local(p)) if p == std::path::Path::new("/tmp/lake"))
        );
        assert!(
            matches!(parse_location("file://weir-data/lake"), Ok(Location::Local(p)) if p == std::path::Path::new("weir-data/lake"))
        );
        match parse_location("s3://bucket/a/b") {
            Ok(Location::Remote { root, .. }) => assert_eq!(root.as_ref(), "a/b"),
            other => panic!("{other:?}"),
        }
        let err = parse_location("ftp://host/x").expect_err("ftp");
        assert!(err.contains("unsupported scheme ftp://"), "{err}");
    }
}
