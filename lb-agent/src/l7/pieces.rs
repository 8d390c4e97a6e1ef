//! Test support: a peer's bytes written in pieces, as its writes would arrive.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes `wire` to `w` cut at `cuts` (taken modulo its length, in order), yielding
/// after each piece so that the reader sees them one at a time.
pub async fn write_in_pieces<W: AsyncWrite + Unpin>(
    w: &mut W,
    wire: &[u8],
    cuts: &[usize],
) -> io::Result<()> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    for cut in cuts.into_iter().chain([wire.len()]) {
        w.write_all(&wire[at..cut]).await?;
        w.flush().await?;
        tokio::task::yield_now().await;
        at = cut;
    }
    Ok(())
}
