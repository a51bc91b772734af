//! The cluster description parser under the fuzz driver; `WGMESH_FUZZ_SECONDS` sets the
//! budget (see the crate documentation).

#[test]
fn cluster() {
    wgmesh_fuzz::test(&wgmesh_fuzz::targets::CLUSTER);
}
