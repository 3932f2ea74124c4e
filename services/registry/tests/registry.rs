//! The registry against every store we ship: local disk, and a real S3-compatible server
//! (SeaweedFS, started by `.ci/services`; its endpoint arrives in `FLYWHEEL_TEST_S3`).

use std::sync::Arc;

use flywheel_domain::{DomainName, VersionId};
use flywheel_registry::{Registry, RegistryError};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const S3_ENV: &str = "FLYWHEEL_TEST_S3";
const BUCKET: &str = "flywheel";
const KEY: &str = "flywheel";
const SECRET: &str = "flywheel-secret";

fn s3_endpoint() -> String {
    std::env::var(S3_ENV).unwrap_or_else(|_| {
        panic!(
            "{S3_ENV} is not set: start the test services with `eval \"$(.ci/services)\"` \
             (SeaweedFS on loopback), then run the tests"
        )
    })
}

fn s3_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("aws_endpoint", endpoint),
        ("aws_access_key_id", KEY),
        ("aws_secret_access_key", SECRET),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec()
}

/// A registry plus raw access to the objects underneath, for tampering.
struct Fixture {
    registry: Registry,
    raw: Arc<dyn ObjectStore>,
    /// Key prefix of the registry's root inside `raw`.
    root: String,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn local() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path().to_str().unwrap(), &[]).unwrap();
        let raw = object_store::local::LocalFileSystem::new_with_prefix(
            dir.path().canonicalize().unwrap(),
        )
        .unwrap();
        Self {
            registry,
            raw: Arc::new(raw),
            root: String::new(),
            _dir: Some(dir),
        }
    }

    fn s3() -> Self {
        let endpoint = s3_endpoint();
        // A fresh prefix per test: tests share one bucket and run in parallel.
        let root = format!("test-{}", uuid::Uuid::new_v4());
        let registry = Registry::open(&format!("s3://{BUCKET}/{root}"), &s3_options(&endpoint))
            .expect("opening the S3 registry");
        let raw = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(&endpoint)
            .with_access_key_id(KEY)
            .with_secret_access_key(SECRET)
            .with_region("us-east-1")
            .with_allow_http(true)
            .build()
            .unwrap();
        Self {
            registry,
            raw: Arc::new(raw),
            root: format!("{root}/"),
            _dir: None,
        }
    }

    fn both() -> [Fixture; 2] {
        [Self::local(), Self::s3()]
    }

    async fn tamper(&self, key: &str, bytes: &'static [u8]) {
        let path = ObjPath::from(format!("{}{key}", self.root));
        self.raw
            .put(&path, PutPayload::from_static(bytes))
            .await
            .unwrap();
    }

    async fn remove(&self, key: &str) {
        let path = ObjPath::from(format!("{}{key}", self.root));
        self.raw.delete(&path).await.unwrap();
    }

    async fn with_versions(self, n: u64) -> Self {
        for i in 1..=n {
            self.registry
                .publish(
                    &d(),
                    &VersionId::nth(i),
                    vec![
                        ("a.bin".into(), vec![i as u8; 4]),
                        ("b.bin".into(), vec![i as u8; 2]),
                    ],
                    serde_json::json!({"n": i}),
                )
                .await
                .unwrap();
        }
        self
    }
}

fn d() -> DomainName {
    DomainName::parse("banking").unwrap()
}

#[tokio::test]
async fn versions_are_immutable_and_verified_on_read() {
    for fx in Fixture::both() {
        let fx = fx.with_versions(1).await;
        let reg = &fx.registry;
        let v1 = VersionId::nth(1);
        let again = reg
            .publish(
                &d(),
                &v1,
                vec![("a.bin".into(), vec![9])],
                serde_json::json!({}),
            )
            .await;
        assert!(
            matches!(again, Err(RegistryError::VersionExists { .. })),
            "{again:?}"
        );
        assert_eq!(reg.read_file(&d(), &v1, "a.bin").await.unwrap(), vec![1; 4]);

        fx.tamper("domains/banking/versions/v1/a.bin", b"evil")
            .await;
        let err = reg.read_file(&d(), &v1, "a.bin").await.unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        // A listed file gone missing is refused just the same, naming the object.
        fx.remove("domains/banking/versions/v1/b.bin").await;
        let err = reg.read_file(&d(), &v1, "b.bin").await.unwrap_err();
        assert!(err.to_string().contains("object is missing"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert!(reg.download(&d(), &v1, dir.path()).await.is_err());
    }
}

#[tokio::test]
async fn a_version_without_its_manifest_is_incomplete_and_never_served() {
    for fx in Fixture::both() {
        let fx = fx.with_versions(2).await;
        fx.remove("domains/banking/versions/v2/manifest.json").await;
        let v2 = VersionId::nth(2);
        let err = fx.registry.read_file(&d(), &v2, "a.bin").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "version banking/v2 does not exist or is incomplete"
        );
        let moved = fx
            .registry
            .move_alias(&d(), "production", None, &v2, "t", "x")
            .await;
        assert!(matches!(moved, Err(RegistryError::NoSuchVersion { .. })));
    }
}

#[tokio::test]
async fn alias_moves_are_compare_and_swap_with_history() {
    for fx in Fixture::both() {
        let fx = fx.with_versions(3).await;
        let reg = &fx.registry;
        let (v1, v2, v3) = (VersionId::nth(1), VersionId::nth(2), VersionId::nth(3));
        reg.move_alias(&d(), "production", None, &v1, "alice", "first")
            .await
            .unwrap();
        let stale = reg
            .move_alias(&d(), "production", None, &v2, "bob", "stale view")
            .await;
        assert!(
            matches!(stale, Err(RegistryError::AliasConflict { .. })),
            "{stale:?}"
        );

        // Eight movers from v1 at once: exactly one wins, on every store.
        let dom = d();
        let racers = (0..8).map(|i| {
            let target = if i % 2 == 0 { &v2 } else { &v3 };
            reg.move_alias(&dom, "production", Some(&v1), target, "racer", "race")
        });
        let results = futures::future::join_all(racers).await;
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );

        let history = reg.alias_history(&d(), "production").await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(
            (history[0].by.as_str(), history[0].reason.as_str()),
            ("alice", "first")
        );
        assert_eq!(history[1].from.as_deref(), Some("v1"));
        assert_eq!(history[1].generation, 2);
        let now = reg.resolve(&d(), "production").await.unwrap().unwrap();
        // Rollback is a move back, recorded like any other.
        reg.move_alias(
            &d(),
            "production",
            Some(&VersionId(now.to.clone())),
            &v1,
            "carol",
            "rollback",
        )
        .await
        .unwrap();
        let history = reg.alias_history(&d(), "production").await.unwrap();
        assert_eq!(history.last().unwrap().to, "v1");
        assert_eq!(
            history.last().unwrap().from.as_deref(),
            Some(now.to.as_str())
        );
        // Aliases are independent.
        assert!(reg.resolve(&d(), "staging").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn file_urls_point_into_the_store() {
    let fx = Fixture::s3();
    let url = fx
        .registry
        .file_url(&d(), &VersionId::nth(4), "adapter_model.safetensors");
    assert_eq!(
        url,
        format!(
            "s3://{BUCKET}/{}domains/banking/versions/v4/adapter_model.safetensors",
            fx.root
        )
    );
    let fx = Fixture::local();
    assert!(fx.registry.url().starts_with("file:///"));
}

fn write_model(dir: &std::path::Path, weights: &[u8]) {
    std::fs::write(dir.join("config.json"), br#"{"model_type": "bert"}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(dir.join(".DS_Store"), b"junk").unwrap();
}

#[tokio::test]
async fn base_models_are_content_addressed_and_cached_verified() {
    for fx in Fixture::both() {
        let reg = &fx.registry;
        let src = tempfile::tempdir().unwrap();
        // Bigger than one upload chunk, so the multipart path runs.
        let weights: Vec<u8> = (0..(9usize << 20)).map(|i| (i % 251) as u8).collect();
        write_model(src.path(), &weights);
        let first = reg.import_model(src.path()).await.unwrap();
        assert_eq!(first.model_type.as_deref(), Some("bert"));
        let names: Vec<_> = first.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
        assert!(flywheel_registry::parse_model_ref(&first.reference()).is_some());

        // Same bytes, same id, wherever they come from.
        let copy = tempfile::tempdir().unwrap();
        write_model(copy.path(), &weights);
        assert_eq!(reg.import_model(copy.path()).await.unwrap().id, first.id);
        // Different bytes, different id.
        write_model(copy.path(), b"other weights");
        assert_ne!(reg.import_model(copy.path()).await.unwrap().id, first.id);

        let cache = tempfile::tempdir().unwrap();
        let local = reg.fetch_model(&first.id, cache.path()).await.unwrap();
        assert_eq!(
            std::fs::read(local.join("model.safetensors")).unwrap(),
            weights
        );
        // Cached: a second fetch does not touch the store (tampering goes unnoticed here
        // because the verified copy is what runs).
        fx.tamper(
            &format!("models/{}/tokenizer.json", first.id),
            b"{\"evil\": 1}",
        )
        .await;
        assert_eq!(
            reg.fetch_model(&first.id, cache.path()).await.unwrap(),
            local
        );
        // A fresh machine refuses the tampered file and leaves nothing half-written.
        let fresh = tempfile::tempdir().unwrap();
        let err = reg.fetch_model(&first.id, fresh.path()).await.unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read_dir(fresh.path()).unwrap().count(), 0);

        let unknown = "0".repeat(64);
        let err = reg.fetch_model(&unknown, fresh.path()).await.unwrap_err();
        assert!(err.to_string().contains("flywheel models import"), "{err}");
        let not_a_model = tempfile::tempdir().unwrap();
        let err = reg.import_model(not_a_model.path()).await.unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
    }
}

#[tokio::test]
async fn staged_job_files_travel_between_machines() {
    for fx in Fixture::both() {
        let reg = &fx.registry;
        let here = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(here.path().join("candidate")).unwrap();
        std::fs::write(here.path().join("candidate/adapter.bin"), b"weights").unwrap();
        std::fs::write(here.path().join("train_report.json"), b"{}").unwrap();
        reg.stage_files("job-1", here.path()).await.unwrap();

        let there = tempfile::tempdir().unwrap();
        reg.fetch_staged("job-1", there.path()).await.unwrap();
        assert_eq!(
            std::fs::read(there.path().join("candidate/adapter.bin")).unwrap(),
            b"weights"
        );
        assert!(there.path().join("train_report.json").is_file());

        reg.drop_staged("job-1").await.unwrap();
        let empty = tempfile::tempdir().unwrap();
        reg.fetch_staged("job-1", empty.path()).await.unwrap();
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
    }
}

#[tokio::test]
async fn without_conditional_writes_a_single_writer_still_gets_create_only() {
    let endpoint = s3_endpoint();
    let mut options = s3_options(&endpoint);
    options.push(("aws_conditional_put".into(), "disabled".into()));
    let root = format!("s3://{BUCKET}/test-{}", uuid::Uuid::new_v4());
    // With conditional puts off in the client, create-only writes are refused loudly…
    let strict = Registry::open(&root, &options).unwrap();
    let err = strict
        .publish(&d(), &VersionId::nth(1), vec![], serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("conditional writes"), "{err}");
    // …unless the operator opts into check-then-put.
    options.push((flywheel_registry::CONDITIONAL_WRITES.into(), "false".into()));
    let relaxed = Registry::open(&root, &options).unwrap();
    relaxed
        .publish(&d(), &VersionId::nth(1), vec![], serde_json::json!({}))
        .await
        .unwrap();
    let again = relaxed
        .publish(&d(), &VersionId::nth(1), vec![], serde_json::json!({}))
        .await;
    assert!(matches!(again, Err(RegistryError::VersionExists { .. })));
}

#[test]
fn bad_locations_are_refused_with_what_to_fix() {
    let err = Registry::open("ftp://host/x", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "registry location `ftp://host/x`: unsupported scheme `ftp`; use a path, file://, s3://, gs:// or az://"
    );
    let err = Registry::open("s3://b", &[("aws_nonsense".into(), "1".into())]).unwrap_err();
    assert!(
        err.to_string().contains("unknown s3 option `aws_nonsense`"),
        "{err}"
    );
    let err = Registry::open("s3:///x", &[]).unwrap_err();
    assert!(err.to_string().contains("names no bucket"), "{err}");
}
