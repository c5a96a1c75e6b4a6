//! Running the real program on one packet with BPF_PROG_TEST_RUN.

use aya::programs::{TestRun, TestRunOptions, Xdp};

/// `struct xdp_md` as passed in `ctx_in`: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ingress_ifindex, 0, 0];
    let mut b = [0u8; 24];
    for (i, f) in fields.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&f.to_ne_bytes());
    }
    b
}

/// Runs `prog` once on `frame` arriving on `ingress_ifindex`; returns the XDP action and the
/// frame as the program left it.
pub fn run(prog: &mut Xdp, ingress_ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 512];
    let ctx = xdp_md(frame.len(), ingress_ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Name of an XDP action, for messages.
pub fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    }
}
