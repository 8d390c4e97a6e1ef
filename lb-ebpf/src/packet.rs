//! Bounds-checked access to the frame and the parsed view of one packet, for the XDP
//! program and the tc egress program alike.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{FAMILY_V4, FlowKey, Reason};

/// A packet's bytes as the program sees them: `data()..data_end()` is the part it can
/// read and write directly (all of it in XDP; the linear head of a socket buffer in tc).
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whether the packet holds `end` bytes in all (its IP length is consistent).
    fn holds(&self, end: usize) -> bool;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    /// Compared as `data + end <= data_end`, as `fits` does.
    #[inline(always)]
    fn holds(&self, end: usize) -> bool {
        fits(self, end)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    /// The whole socket buffer, paged data included.
    #[inline(always)]
    fn holds(&self, end: usize) -> bool {
        end <= self.len() as usize
    }
}

/// Reads a `T` at byte offset `off`, or `None` when the frame is shorter.
/// The explicit `data + off + size <= data_end` check is what the verifier needs.
#[inline(always)]
pub fn load<T: Copy>(ctx: &impl Frame, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above.
    Some(unsafe { read_words::<T>(start + off) })
}

/// Reads a `T` from packet memory at `addr` in the widest loads its size allows (8, 4,
/// 2 bytes). `read_unaligned` would compile to one load per byte: the BPF backend
/// assumes nothing about alignment, while the kernel allows misaligned packet loads on
/// the machines XDP runs on (`CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`; the verifier
/// checks packet alignment only under `BPF_F_STRICT_ALIGNMENT`). The loads are written
/// in assembly so that no misaligned access is expressed in Rust; the stack copy is
/// aligned for `u64`, as the verifier requires of stack accesses.
///
/// # Safety
/// `addr..addr + size_of::<T>()` lies inside the checked packet range.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "`out` is aligned to 8 and each width is stored at a multiple of itself"
)]
unsafe fn read_words<T: Copy>(addr: usize) -> T {
    let mut out = Aligned::<T>(core::mem::MaybeUninit::uninit());
    let dst = out.0.as_mut_ptr().cast::<u8>();
    let n = size_of::<T>();
    let mut i = 0;
    // SAFETY (all loads): inside the range the caller checked; every store is into
    // `out` at an offset aligned for its width.
    unsafe {
        while i + 8 <= n {
            let v: u64;
            core::arch::asm!("{0} = *(u64 *)({1} + 0)", out(reg) v, in(reg) addr + i,
                options(pure, readonly, nostack, preserves_flags));
            dst.add(i).cast::<u64>().write(v);
            i += 8;
        }
        while i + 4 <= n {
            let v: u64;
            core::arch::asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) addr + i,
                options(pure, readonly, nostack, preserves_flags));
            dst.add(i).cast::<u32>().write(v as u32);
            i += 4;
        }
        while i + 2 <= n {
            let v: u64;
            core::arch::asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) addr + i,
                options(pure, readonly, nostack, preserves_flags));
            dst.add(i).cast::<u16>().write(v as u16);
            i += 2;
        }
        if i < n {
            dst.add(i).write(*((addr + i) as *const u8));
        }
        out.0.assume_init()
    }
}

/// Whether the frame holds `end` bytes. Compared as `data + end <= data_end`, never
/// as a length: a length derived from `data_end - data` lets LLVM drop later bounds
/// checks that the verifier, which only follows packet pointers, still needs.
#[inline(always)]
pub fn fits(ctx: &impl Frame, end: usize) -> bool {
    ctx.data() + end <= ctx.data_end()
}

/// Writes a `T` at byte offset `off`; `Err` when the frame is shorter.
#[inline(always)]
pub fn store<T: Copy>(ctx: &impl Frame, off: usize, value: T) -> Result<(), Reason> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(Reason::DropMalformed);
    }
    // SAFETY: bounds checked above; packet data has no alignment guarantee.
    unsafe { core::ptr::write_unaligned((start + off) as *mut T, value) };
    Ok(())
}

/// A `T` on the stack aligned for the widest packet access.
#[repr(C, align(8))]
struct Aligned<T>(core::mem::MaybeUninit<T>);

/// The frame's length in bytes (for byte counters).
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Where an IP fragment stands.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// Offset 0 with more fragments: has the L4 header, but the flow cannot be
    /// translated consistently (the other fragments carry no ports).
    First,
}

/// A parsed TCP/UDP packet: header offsets and the 5-tuple as on the wire.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IP header (after Ethernet and an optional 802.1Q tag). Kept as a
    /// byte: wherever the struct lives, the verifier then knows the offset is < 256.
    l3: u8,
    /// Offset of the TCP/UDP header (honours IPv4 IHL; at most 18 + 60).
    l4: u8,
    /// IPv4 total length or IPv6 payload length + 40, for the FIB's MTU check.
    pub ip_len: u16,
    pub key: FlowKey,
    pub fragment: Fragment,
    /// The L4 header lies wholly inside the IP payload and the frame (TCP: data
    /// offset >= 5), so its checksum can be updated.
    pub l4_complete: bool,
}

impl Default for Packet {
    #[inline(always)]
    fn default() -> Packet {
        Packet {
            l3: 0,
            l4: 0,
            ip_len: 0,
            key: FlowKey::default(),
            fragment: Fragment::None,
            l4_complete: false,
        }
    }
}

impl Packet {
    /// Where the headers are, once parsed (the key is filled in place).
    #[inline(always)]
    pub fn set_layout(
        &mut self,
        l3: usize,
        l4: usize,
        ip_len: u16,
        fragment: Fragment,
        l4_complete: bool,
    ) {
        self.l3 = l3 as u8;
        self.l4 = l4 as u8;
        self.ip_len = ip_len;
        self.fragment = fragment;
        self.l4_complete = l4_complete;
    }

    #[inline(always)]
    pub fn l3(&self) -> usize {
        usize::from(self.l3)
    }

    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4)
    }

    pub fn is_v4(&self) -> bool {
        self.key.family == FAMILY_V4
    }

    /// A packet for a frontend can be translated only when whole and unfragmented.
    pub fn check_translatable(&self) -> Result<(), Reason> {
        if self.fragment == Fragment::First {
            return Err(Reason::DropFragment);
        }
        if !self.l4_complete {
            return Err(Reason::DropMalformed);
        }
        Ok(())
    }

    /// A reply we cannot translate is left to the kernel rather than dropped: it is
    /// not addressed to anything of ours.
    pub fn check_reply_translatable(&self) -> Result<(), Reason> {
        if self.fragment == Fragment::First {
            return Err(Reason::PassFragment);
        }
        if !self.l4_complete {
            return Err(Reason::PassMalformed);
        }
        Ok(())
    }
}

/// The ones' complement sum (unfolded) of the `N` bytes at `off`, as big-endian 16-bit
/// words; `None` when the frame is shorter. One bounds check covers every read.
#[inline(always)]
pub fn sum_words<const N: usize>(ctx: &impl Frame, off: usize) -> Option<u32> {
    let start = ctx.data() + off;
    if start + N > ctx.data_end() {
        return None;
    }
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        // SAFETY: inside the range checked above; no alignment guarantee needed.
        let word = unsafe { core::ptr::read_unaligned((start + i) as *const [u8; 2]) };
        sum += u32::from(u16::from_be_bytes(word));
        i += 2;
    }
    Some(sum)
}
