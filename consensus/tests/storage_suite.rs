//! openraft's own storage test suite, run against the redb log store and
//! state machine, each test on a fresh database in a temp dir.

use openraft::testing::{StoreBuilder, Suite};
use unid_consensus::store::{self, LogStore, StateMachineStore};
use unid_consensus::types::{StorageError, TypeConfig};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("storage suite failed: {e}");
    }
}

/// The same store on a custom redb backend (memory), with its redb calls
/// run inline (`IoMode::Inline`, what the deterministic simulator uses).
struct InlineMemoryBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()> for InlineMemoryBuilder {
    async fn build(&self) -> Result<((), LogStore, StateMachineStore), StorageError> {
        let backend = redb::backends::InMemoryBackend::new();
        let (log, sm) =
            store::open_with_backend(backend, store::IoMode::Inline, "memory").expect("open store");
        Ok(((), log, sm))
    }
}

#[test]
fn openraft_storage_suite_on_a_custom_backend_inline() {
    if let Err(e) = Suite::test_all(InlineMemoryBuilder) {
        panic!("storage suite failed: {e}");
    }
}
