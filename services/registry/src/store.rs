//! Turning one location setting into an object store.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::prefix::PrefixStore;

use crate::{Registry, RegistryError, Result};

/// The flywheel-level option that is not an object_store key: whether the store honours
/// create-only puts.
pub const CONDITIONAL_WRITES: &str = "conditional_writes";

pub(crate) fn open(location: &str, options: &[(String, String)]) -> Result<Registry> {
    let bad = |message: String| RegistryError::Config {
        location: location.to_owned(),
        message,
    };
    let mut conditional_writes = true;
    let mut store_options = Vec::new();
    for (key, value) in options {
        if key == CONDITIONAL_WRITES {
            conditional_writes = value
                .parse()
                .map_err(|_| bad(format!("{CONDITIONAL_WRITES} must be true or false")))?;
        } else {
            store_options.push((key.to_ascii_lowercase(), value.clone()));
        }
    }
    if let Some(path) = local_path(location) {
        return Registry::local(std::path::Path::new(path));
    }
    let (store, base_url) = remote(location, &store_options)?;
    Ok(Registry {
        store,
        base_url,
        local_root: None,
        conditional_writes,
    })
}

/// The directory a location names if it is local: a path, or a `file://` URL's path.
pub fn local_path(location: &str) -> Option<&str> {
    match location.split_once("://") {
        None => Some(location),
        Some(("file", rest)) => Some(rest),
        Some(_) => None,
    }
}

/// The object store an `s3://`, `gs://` or `az://` URL names, scoped to the URL's prefix,
/// and that prefix's URL. `options` are object_store config keys (lowercase), which win over
/// the environment. For other readers of object stores, such as the ingestion worker.
pub fn remote(
    location: &str,
    store_options: &[(String, String)],
) -> Result<(Arc<dyn ObjectStore>, String)> {
    let bad = |message: String| RegistryError::Config {
        location: location.to_owned(),
        message,
    };
    let Some((scheme, rest)) = location.split_once("://") else {
        return Err(bad("not a URL".into()));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    if bucket.is_empty() {
        return Err(bad("the URL names no bucket".into()));
    }
    let bucket_url = format!("{scheme}://{bucket}");
    let unknown = |key: &str| bad(format!("unknown {scheme} option `{key}`"));
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env().with_url(&bucket_url);
            for (k, v) in store_options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build()?)
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(&bucket_url);
            for (k, v) in store_options {
                let key: GoogleConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build()?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(&bucket_url);
            for (k, v) in store_options {
                let key: AzureConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build()?)
        }
        other => {
            return Err(bad(format!(
                "unsupported scheme `{other}`; use a path, file://, s3://, gs:// or az://"
            )));
        }
    };
    Ok(if prefix.is_empty() {
        (store, bucket_url)
    } else {
        (
            Arc::new(PrefixStore::new(store, prefix)),
            format!("{bucket_url}/{prefix}"),
        )
    })
}
