//! The one sink for counters: per-CPU, so no atomics on the packet path.

use lb_common::Reason;

use crate::maps::{REASON_STATS_V1, SVC_STATS_V1};

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    if let Some(s) = REASON_STATS_V1.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_service(service_id: u32, bytes: u64, new_flow: bool) {
    if let Some(s) = SVC_STATS_V1.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            if new_flow {
                (*s).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count_reply(service_id: u32, bytes: u64) {
    if let Some(s) = SVC_STATS_V1.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe {
            (*s).reply_packets += 1;
            (*s).reply_bytes += bytes;
        }
    }
}
