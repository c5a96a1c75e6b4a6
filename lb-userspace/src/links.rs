//! The pinned XDP links: their pin names (an interface name may hold characters a BPF
//! filesystem name may not) and their state in the kernel (a link whose interface was deleted
//! is detached by the kernel but its pin stays).

use std::{
    ffi::CString,
    mem::{size_of, size_of_val},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context, Result};

/// An interface name as part of a pin name: `%` and `.` percent-encoded (a BPF filesystem
/// refuses names with a dot, so VLAN sub-interfaces such as `eth0.100` need it; `%` is encoded
/// so that every name decodes back to itself).
pub fn escape_iface(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

/// The interface name an `escape_iface` result stands for.
pub fn unescape_iface(s: &str) -> String {
    s.replace("%2e", ".").replace("%25", "%")
}

/// The pin name of a link of `prefix` (`link_`, `decap_`) on `iface` in `mode`.
pub fn pin_name(prefix: &str, iface: &str, mode: &str) -> String {
    format!("{prefix}{}_{mode}", escape_iface(iface))
}

/// (interface, mode) of a pin name of `prefix`.
pub fn parse_pin_name(prefix: &str, name: &str) -> Option<(String, String)> {
    let (iface, mode) = name.strip_prefix(prefix)?.rsplit_once('_')?;
    Some((unescape_iface(iface), mode.to_string()))
}

/// The index of interface `iface` in this network namespace (0: no such interface).
pub fn iface_index(iface: &str) -> u32 {
    let Ok(c) = CString::new(iface) else {
        return 0;
    };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The bpf(2) system call with `attr` (a prefix of `union bpf_attr`, `what` naming the
/// operation in an error).
fn bpf<T>(cmd: libc::c_long, attr: &T, what: impl FnOnce() -> String) -> Result<i64> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size given, and every pointer in it
    // is valid for the call (the callers keep what it points at alive).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if r < 0 {
        bail!("{}: {}", what(), std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The interface index the XDP link pinned at `pin` is attached to; 0 once its interface is
/// gone (the kernel then detaches the link, which lives on only through the pin).
pub fn link_ifindex(pin: &Path) -> Result<u32> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .with_context(|| format!("invalid pin path {}", pin.display()))?;
    // BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &get, || {
        format!("opening the link pinned at {}", pin.display())
    })?;
    // SAFETY: the kernel just gave us this descriptor; the OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then the per-type union at offset 16 (8-byte
    // aligned), whose `xdp.ifindex` is its first u32: word 4. 64 bytes is a prefix of it the
    // kernel fills.
    let mut info = [0u32; 16];
    // BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let get_info = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &get_info, || {
        format!("reading the link pinned at {}", pin.display())
    })?;
    Ok(info[4])
}

/// Whether `iface` carries Ethernet frames (`ARPHRD_ETHER`: NICs, veths, bridges, VLAN
/// devices), which lb's programs parse; None if the kernel cannot say (no such interface).
pub fn is_ethernet(iface: &str) -> Option<bool> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return None;
    }
    // SAFETY: the ioctl filled the hardware-address member of the union.
    Some(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } == libc::ARPHRD_ETHER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_any_interface_name() {
        for iface in [
            "eth0",
            "eth0.100",
            "bond0.10.20",
            "a%2e",
            "a.%",
            "x_y",
            "%",
            "...",
        ] {
            let name = pin_name("link_", iface, "native");
            assert!(!name.contains('.'), "{name}");
            assert_eq!(
                parse_pin_name("link_", &name),
                Some((iface.to_string(), "native".to_string())),
                "{iface}"
            );
        }
        assert_eq!(
            pin_name("link_", "eth0.100", "generic"),
            "link_eth0%2e100_generic"
        );
        assert_eq!(parse_pin_name("decap_", "link_eth0_native"), None);
    }
}
