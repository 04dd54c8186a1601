//! Batching prompts: left padding of ids, attention masks and label rows.

/// Label value ignored by the cross-entropy loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A left-padded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Row-major `[batch, seq_len]`, pad ids on the left.
    pub input_ids: Vec<u32>,
    /// Row-major `[batch, seq_len]`: 0 on padding, 1 on tokens.
    pub attention_mask: Vec<u32>,
    /// Number of rows.
    pub batch: usize,
    /// Length of the longest sequence.
    pub seq_len: usize,
}

/// Left-pads token sequences to the longest one (generation appends on the right, so every row
/// must end at the same position).
///
/// # Shapes
/// - returns `input_ids`/`attention_mask` `[batch, max_len]`
pub fn left_pad(seqs: &[Vec<u32>], pad_id: u32) -> PaddedBatch {
    let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(seqs.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(seqs.len() * seq_len);
    for s in seqs {
        let pad = seq_len - s.len();
        input_ids.extend(std::iter::repeat_n(pad_id, pad));
        input_ids.extend_from_slice(s);
        attention_mask.extend(std::iter::repeat_n(0, pad));
        attention_mask.extend(std::iter::repeat_n(1, s.len()));
    }
    PaddedBatch {
        input_ids,
        attention_mask,
        batch: seqs.len(),
        seq_len,
    }
}

/// Left-pads label rows with [`IGNORE_INDEX`] to `seq_len`, matching [`left_pad`] of their ids.
///
/// # Shapes
/// - returns `[labels.len(), seq_len]`; rows longer than `seq_len` are kept whole (caller error)
pub fn left_pad_labels(labels: &[Vec<i64>], seq_len: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(labels.len() * seq_len);
    for l in labels {
        out.extend(std::iter::repeat_n(
            IGNORE_INDEX,
            seq_len.saturating_sub(l.len()),
        ));
        out.extend_from_slice(l);
    }
    out
}
