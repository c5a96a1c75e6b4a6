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

/// Which of lb's two programs a table runs its packets through: `lb_xdp`, or the same data
/// plane as the tc program `lb_tc`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Xdp,
    Tc,
}

// tc return codes (include/uapi/linux/pkt_cls.h). lb passes with TC_ACT_UNSPEC ("next": the
// interface's other tc programs, then the stack), never TC_ACT_OK, which would skip them.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// `struct __sk_buff` as passed in `ctx_in` (192 bytes): only the fields the kernel lets a
/// test set — the ingress interface (`ingress_ifindex`, offset 36; `ifindex`, 40, the device
/// the packet is on) and GSO (`gso_segs`, 164; `gso_size`, 176).
fn sk_buff(ingress_ifindex: u32, gso_size: u32, gso_segs: u32) -> [u8; 192] {
    let mut b = [0u8; 192];
    for (off, v) in [
        (36, ingress_ifindex),
        (40, ingress_ifindex),
        (164, gso_segs),
        (176, gso_size),
    ] {
        b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

/// Runs `lb_tc` once on `frame` arriving on `ingress_ifindex` (a GSO packet if `gso_size` is
/// not 0); returns the tc action in XDP's terms (TC_ACT_UNSPEC: XDP_PASS, TC_ACT_SHOT: XDP_DROP,
/// TC_ACT_REDIRECT: XDP_REDIRECT — which is also how tc sends a packet back out of the
/// interface it came in on) and the packet as the program left it. None: the kernel refused
/// to make a socket buffer of a frame shorter than Ethernet's minimum of 60 bytes (it does for
/// truncated headers), which a tc program never sees.
pub fn run_tc(
    prog: &mut aya::programs::SchedClassifier,
    ingress_ifindex: u32,
    frame: &[u8],
    gso_size: u32,
) -> Option<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 512];
    let segs = if gso_size == 0 {
        0
    } else {
        frame.len().div_ceil(gso_size as usize) as u32
    };
    let ctx = sk_buff(ingress_ifindex, gso_size, segs);
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    });
    let r = match r {
        Ok(r) => r,
        Err(aya::programs::ProgramError::SyscallError(e))
            if frame.len() < 60 && e.io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            return None
        }
        Err(e) => panic!("BPF_PROG_TEST_RUN (tc) of {} bytes: {e:?}", frame.len()),
    };
    out.truncate(r.data_size_out as usize);
    let action = match r.return_value {
        TC_ACT_UNSPEC => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT => XDP_REDIRECT,
        other => panic!("lb_tc returned {other}"),
    };
    Some((action, out))
}

/// Runs the packet through the `kind` program of `dp` (None: see `run_tc`).
pub fn run_kind(
    dp: &mut lb::Dataplane,
    kind: Kind,
    ingress_ifindex: u32,
    frame: &[u8],
) -> Option<(u32, Vec<u8>)> {
    match kind {
        Kind::Xdp => Some(run(dp.program(), ingress_ifindex, frame)),
        Kind::Tc => run_tc(dp.tc_program(), ingress_ifindex, frame, 0),
    }
}

/// The verdict a tc program gives where XDP's is `xdp`: tc sends a packet back out of its
/// interface with a redirect.
pub fn tc_verdict(xdp: u32) -> u32 {
    if xdp == XDP_TX {
        XDP_REDIRECT
    } else {
        xdp
    }
}
