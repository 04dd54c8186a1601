//! Training samples and their collation into padded micro-batches, as transformers'
//! `DataCollatorForSeq2Seq` pads them: input ids right-padded (attention mask false), labels
//! padded with -100, the images of a batch concatenated in sample order
//! (`Qwen2_5_VLForConditionalGeneration` takes `pixel_values` of all images at once).

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::kernels::Kernels;
use crate::model::ImageInput;
use crate::train::loss::IGNORE_INDEX;

/// One supervised example: the full prompt + answer tokens and their labels.
#[derive(Debug, Clone)]
pub struct TrainSample<B: Kernels> {
    /// Prompt and answer token ids (image placeholders expanded).
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`: the token id where the loss counts, [`IGNORE_INDEX`]
    /// elsewhere (prompt, image tokens).
    pub labels: Vec<i64>,
    /// The sample's images, when it has any (pixel values never need gradients, so they
    /// live on the non-autodiff backend).
    pub images: Option<ImageInput<B>>,
}

/// Random access to samples, so a resumed run can replay the same shuffled order. `Sync`:
/// the trainer loads the next window on another thread while a step computes.
pub trait SampleSource<B: Kernels>: Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index` (< `len()`).
    ///
    /// # Errors
    /// Whatever reading or decoding the sample fails with.
    fn get(&self, index: usize) -> Result<TrainSample<B>, SampleError>;
}

/// A sample that could not be produced or is malformed.
#[derive(Debug, thiserror::Error)]
#[error("training sample {index}: {reason}")]
pub struct SampleError {
    /// Index in its source.
    pub index: usize,
    /// What is wrong, with the numbers.
    pub reason: String,
}

impl<B: Kernels> SampleSource<B> for [TrainSample<B>] {
    fn len(&self) -> usize {
        <[TrainSample<B>]>::len(self)
    }

    fn get(&self, index: usize) -> Result<TrainSample<B>, SampleError> {
        self.get(index).cloned().ok_or_else(|| SampleError {
            index,
            reason: format!("out of range ({} samples)", <[TrainSample<B>]>::len(self)),
        })
    }
}

impl<B: Kernels> SampleSource<B> for Vec<TrainSample<B>> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn get(&self, index: usize) -> Result<TrainSample<B>, SampleError> {
        SampleSource::get(self.as_slice(), index)
    }
}

/// A right-padded micro-batch.
#[derive(Debug, Clone)]
pub struct Batch<B: Kernels> {
    /// `batch` rows of `seq` ids (padding: 0).
    pub input_ids: Vec<Vec<u32>>,
    /// `batch` rows of `seq` flags, false on padding.
    pub attention_mask: Vec<Vec<bool>>,
    /// `[batch, seq]` labels, [`IGNORE_INDEX`] on padding.
    pub labels: Tensor<B, 2, Int>,
    /// All images of the batch, in sample order.
    pub images: Option<ImageInput<B>>,
    /// Tokens whose next-token loss counts (labels at positions 1.., not ignored).
    pub label_tokens: usize,
    /// Real (unpadded) input tokens.
    pub input_tokens: usize,
}

/// Tokens of `labels` that enter the shifted loss.
pub fn counted_tokens(labels: &[i64]) -> usize {
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// Pads `samples` (indices `indices`, for messages) into one batch on `device`.
///
/// # Errors
/// [`SampleError`] for an empty sample or labels of a different length than its ids.
pub fn collate<B: Kernels>(
    samples: &[TrainSample<B>],
    indices: &[usize],
    device: &B::Device,
) -> Result<Batch<B>, SampleError> {
    for (s, &index) in samples.iter().zip(indices) {
        if s.input_ids.is_empty() || s.input_ids.len() != s.labels.len() {
            return Err(SampleError {
                index,
                reason: format!(
                    "{} input ids and {} labels (expected equal, non-zero lengths)",
                    s.input_ids.len(),
                    s.labels.len()
                ),
            });
        }
    }
    let seq = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(samples.len());
    let mut mask = Vec::with_capacity(samples.len());
    let mut labels = Vec::with_capacity(samples.len() * seq);
    let (mut label_tokens, mut input_tokens) = (0, 0);
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for s in samples {
        let n = s.input_ids.len();
        let mut row = s.input_ids.clone();
        row.resize(seq, 0);
        ids.push(row);
        let mut m = vec![true; n];
        m.resize(seq, false);
        mask.push(m);
        labels.extend_from_slice(&s.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - n));
        label_tokens += counted_tokens(&s.labels);
        input_tokens += n;
        if let Some(img) = &s.images {
            pixels.push(img.pixel_values.clone());
            grids.extend_from_slice(&img.grids);
        }
    }
    // Samples load on the first device; a data parallel peer collates onto its own.
    let images = (!pixels.is_empty()).then(|| ImageInput {
        pixel_values: Tensor::cat(pixels, 0).to_device(device),
        grids,
    });
    Ok(Batch {
        labels: Tensor::from_data(TensorData::new(labels, [samples.len(), seq]), device),
        input_ids: ids,
        attention_mask: mask,
        images,
        label_tokens,
        input_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    fn sample(ids: &[u32], labels: &[i64]) -> TrainSample<TB> {
        TrainSample {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            images: None,
        }
    }

    #[test]
    fn rows_are_right_padded_with_masked_labels_and_counted_tokens() {
        let dev = Default::default();
        let s = [
            sample(&[5, 6, 7], &[IGNORE_INDEX, 6, 7]),
            sample(&[8], &[8]),
        ];
        let b = collate(&s, &[0, 1], &dev).unwrap();
        assert_eq!(b.input_ids, vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(
            b.attention_mask,
            vec![vec![true, true, true], vec![true, false, false]]
        );
        assert_eq!(
            b.labels.into_data().to_vec::<i64>().unwrap(),
            vec![IGNORE_INDEX, 6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
        );
        // label 0 of each row is never predicted
        assert_eq!(b.label_tokens, 2);
        assert_eq!(b.input_tokens, 4);
        assert!(b.images.is_none());
    }

    #[test]
    fn labels_of_another_length_are_rejected_naming_the_sample() {
        let e = collate(&[sample(&[1, 2], &[1])], &[17], &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sample 17") && e.contains("2 input ids and 1 labels"),
            "{e}"
        );
    }
}
