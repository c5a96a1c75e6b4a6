mod common;
#[test]
fn loads() {
    let g = common::topology::Gateway::new("smoke");
    assert!(g.ifindex_a > 0);
}
