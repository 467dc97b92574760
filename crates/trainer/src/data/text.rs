//! Plain text for character-level language models: a UTF-8 file (gzip or plain), the vocabulary
//! of its distinct characters, the token ids of the training and validation parts, and the
//! windows a model trains on.
//!
//! As nanoGPT's `shakespeare_char`: the vocabulary is the sorted distinct characters of the
//! training file, a character's id is its rank in it, and a window of `context + 1` characters
//! gives `context` inputs and, shifted by one, their `context` next characters as targets.
//!
//! Encoding and the scan for distinct characters run on the pool over chunks of the text whose
//! bounds follow from the text alone ([`CHUNK_BYTES`]); each chunk writes its own tokens, so the
//! results do not depend on the thread count.

use std::io::Read;
use std::path::Path;

use burn::prelude::*;
use rayon::prelude::*;

use super::{Input, read_error};
use crate::error::{Error, Result};
use crate::files::{self, ReadError};

/// The most characters a vocabulary may hold. Token ids are 16 bits, and the encoder's table
/// keeps `u16::MAX` to mark a character outside the vocabulary.
pub const MAX_VOCABULARY: usize = u16::MAX as usize;

/// Marks a character outside the vocabulary in [`Vocabulary::table`].
const ABSENT: u16 = u16::MAX;

/// Bytes of text per rayon task when encoding or scanning: a constant, so that the chunks (and
/// the first unknown character reported) do not depend on the thread count.
const CHUNK_BYTES: usize = 1 << 20;

/// The most text a file may hold: 64 GiB, as a CSV file. The text is held whole, so memory is
/// the bound that usually applies ([`text_limit`]); this one bounds the time spent where the
/// memory cannot be read.
const TEXT_LIMIT: u64 = 64 << 30;

/// The largest vocabulary file read: 65,535 characters written as JSON escapes of surrogate
/// pairs (`"\ud83d\ude00",`), one a line and indented, take about 1.3 MiB.
const VOCABULARY_FILE_LIMIT: u64 = 4 << 20;

/// A character vocabulary: the sorted distinct characters of a text, each one's id its rank.
///
/// Saved as JSON (`{"chars": ["\n", " ", "!", ...]}`); a deserialized one is checked as
/// [`Vocabulary::load`] describes, whatever it was read from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "VocabularyFile")]
pub struct Vocabulary {
    chars: Vec<char>,
}

/// A vocabulary as its file holds it, before its characters are checked.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VocabularyFile {
    chars: Vec<char>,
}

impl TryFrom<VocabularyFile> for Vocabulary {
    type Error = String;

    fn try_from(file: VocabularyFile) -> Result<Self, String> {
        Vocabulary::from_sorted(file.chars)
    }
}

/// A text with more distinct characters than 16-bit token ids can tell apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{distinct} distinct characters, more than the 65,535 a vocabulary may hold (token ids are 16 \
     bits)"
)]
pub struct TooManyChars {
    pub distinct: usize,
}

/// A character of a text that the vocabulary lacks, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} at byte {byte} is not in the vocabulary", describe(*.character))]
pub struct UnknownChar {
    pub character: char,
    /// Offset of its first byte in the text.
    pub byte: usize,
}

/// A character as a message shows it: escaped where it does not print (`'\u{301}'`), and its
/// code point (`'é' (U+00E9)`), since many look alike.
fn describe(character: char) -> String {
    format!("{character:?} (U+{:04X})", character as u32)
}

impl Vocabulary {
    /// The sorted distinct characters of `text`.
    pub fn from_text(text: &str) -> Result<Self, TooManyChars> {
        Self::from_text_in_chunks(text, CHUNK_BYTES)
    }

    fn from_text_in_chunks(text: &str, chunk_bytes: usize) -> Result<Self, TooManyChars> {
        // A union of sets is exact in any grouping: the reduction's order cannot change it.
        let present = char_chunks(text, chunk_bytes)
            .par_iter()
            .map(|&(_, chunk)| CharSet::of(chunk))
            .reduce(CharSet::default, CharSet::union);
        let chars = present.chars();
        if chars.len() > MAX_VOCABULARY {
            return Err(TooManyChars {
                distinct: chars.len(),
            });
        }
        Ok(Self { chars })
    }

    /// A vocabulary of `chars` as given: they must be sorted, distinct, at least one and at most
    /// [`MAX_VOCABULARY`].
    fn from_sorted(chars: Vec<char>) -> Result<Self, String> {
        if chars.is_empty() {
            return Err("the vocabulary holds no character".into());
        }
        if chars.len() > MAX_VOCABULARY {
            return Err(TooManyChars {
                distinct: chars.len(),
            }
            .to_string());
        }
        if let Some(pair) = chars.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(if pair[0] == pair[1] {
                format!("{} appears twice", describe(pair[0]))
            } else {
                format!(
                    "characters out of order: {} before {}",
                    describe(pair[0]),
                    describe(pair[1])
                )
            });
        }
        Ok(Self { chars })
    }

    /// Characters in the vocabulary: the number of token ids.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The token id of each character of `text`; the first character the vocabulary lacks is
    /// an error that names it and its byte offset.
    pub fn encode(&self, text: &str) -> Result<Vec<u16>, UnknownChar> {
        self.encode_in_chunks(text, CHUNK_BYTES)
    }

    /// [`Vocabulary::encode`] over chunks of about `chunk_bytes` bytes: the chunks' characters
    /// are counted first, so that each task writes its own part of one output.
    fn encode_in_chunks(&self, text: &str, chunk_bytes: usize) -> Result<Vec<u16>, UnknownChar> {
        let table = self.table();
        let chunks = char_chunks(text, chunk_bytes);
        let counts: Vec<usize> = chunks
            .par_iter()
            .map(|&(_, chunk)| chunk.chars().count())
            .collect();
        let mut tokens = vec![0u16; counts.iter().sum()];
        let mut parts = Vec::with_capacity(chunks.len());
        let mut rest = tokens.as_mut_slice();
        for &count in &counts {
            let (part, tail) = rest.split_at_mut(count);
            parts.push(part);
            rest = tail;
        }
        let failures: Vec<Option<UnknownChar>> = parts
            .into_par_iter()
            .zip(chunks.par_iter())
            .map(|(out, &(start, chunk))| encode_chunk(&table, chunk, start, out).err())
            .collect();
        // Chunks in text order: the first failure is the one nearest the start.
        match failures.into_iter().flatten().next() {
            Some(unknown) => Err(unknown),
            None => Ok(tokens),
        }
    }

    /// The token id of every character up to the last one in the vocabulary, by code point;
    /// [`ABSENT`] for those it lacks.
    fn table(&self) -> Vec<u16> {
        let len = self.chars.last().map_or(0, |&c| c as usize + 1);
        let mut table = vec![ABSENT; len];
        for (id, &c) in self.chars.iter().enumerate() {
            // At most MAX_VOCABULARY characters: every id fits below ABSENT.
            table[c as usize] = id as u16;
        }
        table
    }

    /// The text of token ids; an id past the vocabulary (a model of another one) shows as
    /// U+FFFD, the replacement character.
    pub fn decode(&self, ids: &[u16]) -> String {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(usize::from(id))
                    .copied()
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }

    /// Writes the vocabulary as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        files::write_atomically(path, &json)
    }

    /// Reads a vocabulary [`Vocabulary::save`] wrote. A file that is not one, or whose
    /// characters are empty, repeated, out of order or more than [`MAX_VOCABULARY`], is refused
    /// with an error naming it: the ids a model learned would otherwise mean other characters.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = files::read_regular(path, Some(VOCABULARY_FILE_LIMIT)).map_err(|e| {
            let message = match e {
                ReadError::NotFound => "vocabulary file not found".to_string(),
                ReadError::Io(e) => format!("cannot read vocabulary file: {e}"),
                ReadError::TooLarge { limit } => format!(
                    "larger than {} MiB, more than any vocabulary file takes",
                    limit >> 20
                ),
                other => other.to_string(),
            };
            Error::data(path, message)
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::data(path, format!("not a vocabulary file: {e}")))
    }
}

/// A set of characters, one bit each, as long as its largest code point needs.
#[derive(Default)]
struct CharSet {
    words: Vec<u64>,
}

impl CharSet {
    fn of(text: &str) -> Self {
        let mut set = Self::default();
        for c in text.chars() {
            set.insert(c);
        }
        set
    }

    fn insert(&mut self, c: char) {
        let (word, bit) = (c as usize / 64, c as usize % 64);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << bit;
    }

    fn union(self, other: Self) -> Self {
        let (mut wide, narrow) = if self.words.len() >= other.words.len() {
            (self, other)
        } else {
            (other, self)
        };
        for (a, b) in wide.words.iter_mut().zip(narrow.words) {
            *a |= b;
        }
        wide
    }

    /// The characters in the set, in code point order.
    fn chars(&self) -> Vec<char> {
        let mut chars = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                // Only characters were inserted: every bit set is a valid code point.
                chars.extend(char::from_u32(w as u32 * 64 + bit));
            }
        }
        chars
    }
}

/// `text` cut into pieces of about `chunk_bytes` bytes, each ending on a character boundary,
/// with the byte offset where each starts.
fn char_chunks(text: &str, chunk_bytes: usize) -> Vec<(usize, &str)> {
    let mut chunks = Vec::with_capacity(text.len() / chunk_bytes.max(1) + 1);
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + chunk_bytes.max(1)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        chunks.push((start, &text[start..end]));
        start = end;
    }
    chunks
}

/// Writes the token ids of `chunk`, which starts at byte `start` of its text, to `out` (one slot
/// a character).
fn encode_chunk(
    table: &[u16],
    chunk: &str,
    start: usize,
    out: &mut [u16],
) -> Result<(), UnknownChar> {
    for ((offset, c), slot) in chunk.char_indices().zip(out) {
        match table.get(c as usize) {
            Some(&id) if id != ABSENT => *slot = id,
            _ => {
                return Err(UnknownChar {
                    character: c,
                    byte: start + offset,
                });
            }
        }
    }
    Ok(())
}

/// A text too short for one window of `context + 1` tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", too_short(*.tokens, *.context))]
pub struct TooShort {
    pub tokens: usize,
    pub context: usize,
}

fn too_short(tokens: usize, context: usize) -> String {
    format!(
        "{tokens} characters, fewer than the {} one window of context {context} takes (its \
         characters and the next one)",
        context as u128 + 1
    )
}

/// The token ids of a text, and the windows a model trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenText {
    tokens: Vec<u16>,
}

impl TokenText {
    pub fn new(tokens: Vec<u16>) -> Self {
        Self { tokens }
    }

    /// Tokens: one a character.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u16] {
        &self.tokens
    }

    /// The windows of `context + 1` tokens that fit, at positions `0..windows`; an error where
    /// none does. A text that [`load_text`] or [`load_with`] gave for `context` holds one.
    pub fn windows(&self, context: usize) -> Result<usize, TooShort> {
        match self.tokens.len().saturating_sub(context) {
            0 => Err(TooShort {
                tokens: self.tokens.len(),
                context,
            }),
            windows => Ok(windows),
        }
    }

    /// The windows starting at `positions`: inputs `[n, context]` and targets `[n, context]`,
    /// each target the token after its input.
    ///
    /// # Panics
    /// Where a position is not below [`TokenText::windows`]: positions come from the sampler,
    /// never from a file.
    pub fn batch(
        &self,
        positions: &[usize],
        context: usize,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let (inputs, targets) = self.windows_at(positions, context);
        let shape = [positions.len(), context];
        (
            Tensor::from_data(TensorData::new(inputs, shape), device),
            Tensor::from_data(TensorData::new(targets, shape), device),
        )
    }

    /// The inputs and targets of the windows at `positions`, row after row, as burn's i64 ids.
    fn windows_at(&self, positions: &[usize], context: usize) -> (Vec<i64>, Vec<i64>) {
        let values = positions.len().saturating_mul(context);
        let mut inputs = Vec::with_capacity(values);
        let mut targets = Vec::with_capacity(values);
        for &position in positions {
            let window = (context.checked_add(1))
                .and_then(|span| position.checked_add(span))
                .and_then(|end| self.tokens.get(position..end))
                .unwrap_or_else(|| {
                    panic!(
                        "the window of context {context} at {position} runs past the text's {} \
                         tokens",
                        self.tokens.len()
                    )
                });
            inputs.extend(window[..context].iter().map(|&t| i64::from(t)));
            targets.extend(window[1..].iter().map(|&t| i64::from(t)));
        }
        (inputs, targets)
    }

    /// The fixed validation windows: `count` positions spread evenly from the first window to
    /// the last (`i * (windows - 1) / (count - 1)`), or every window where no more than `count`
    /// fit. No generator: every evaluation scores the same windows.
    pub fn evaluation_positions(&self, context: usize, count: usize) -> Vec<usize> {
        let windows = self.tokens.len().saturating_sub(context);
        match count {
            0 => Vec::new(),
            _ if windows <= count => (0..windows).collect(),
            1 => vec![0],
            _ => {
                // In u128: i * (windows - 1) passes u64 for texts of more than 2^32 tokens.
                let (last, steps) = ((windows - 1) as u128, (count - 1) as u128);
                (0..count as u128)
                    .map(|i| (i * last / steps) as usize)
                    .collect()
            }
        }
    }
}

/// Reads a UTF-8 text file, gzip or plain (told apart by its first bytes), gunzipped as a stream
/// within a limit on the text ([`text_limit`]): a gzip bomb is refused as it inflates. Refuses
/// invalid UTF-8, naming the offset of the first invalid byte, and a file that holds no text.
pub fn read_text(path: &Path) -> Result<String> {
    read_text_within(path, &text_limit(crate::usage::memory_limit_bytes()))
}

/// The most bytes of text a file may hold, and why, as a refusal says it.
struct TextLimit {
    bytes: u64,
    why: String,
}

/// A quarter of the memory this process may use (see [`crate::usage::memory_limit_bytes`]), at
/// most [`TEXT_LIMIT`]. Loading a text takes about four times its size at its peak: its bytes
/// in a buffer that may have doubled as a gzip stream of unknown length grew, and two bytes of
/// token id a character (one byte a character in ASCII).
fn text_limit(memory: Option<u64>) -> TextLimit {
    match memory.map(|memory| (memory, memory / 4)) {
        Some((memory, quarter)) if quarter < TEXT_LIMIT => TextLimit {
            bytes: quarter,
            why: format!(
                "a quarter of the {} this process may use, as loading takes about four times \
                 the text's size",
                size(memory)
            ),
        },
        _ => TextLimit {
            bytes: TEXT_LIMIT,
            why: "the most a text file may hold".into(),
        },
    }
}

fn read_text_within(path: &Path, limit: &TextLimit) -> Result<String> {
    let input = Input::open(path)?;
    let gzip = input.gzip;
    let mut bytes = Vec::new();
    if !gzip {
        // A plain file's size is known: one allocation instead of a growing buffer. A hint only
        // (the file can change while it is read), so a failed reservation changes nothing.
        let expected = usize::try_from(input.file_size.min(limit.bytes)).unwrap_or(0);
        let _ = bytes.try_reserve_exact(expected);
    }
    input
        .reader
        .take(limit.bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| read_error(path, gzip, e))?;
    if bytes.len() as u64 > limit.bytes {
        return Err(Error::data(
            path,
            format!("more than {} of text, {}", size(limit.bytes), limit.why),
        ));
    }
    if bytes.is_empty() {
        return Err(Error::data(path, "holds no text"));
    }
    String::from_utf8(bytes).map_err(|e| {
        let whose = if gzip {
            " of the decompressed text"
        } else {
            ""
        };
        Error::data(
            path,
            format!(
                "invalid UTF-8 at byte {}{whose}",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// `bytes` in the largest unit it reaches, whole where it is a whole number of them.
fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            return if bytes.is_multiple_of(1 << shift) {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

/// Where the validation text comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSource<'a> {
    /// A file of its own, encoded with the training text's vocabulary.
    Text(&'a Path),
    /// The last fraction of the training text, strictly between 0 and 1.
    Fraction(f64),
}

/// The texts of a run and their vocabulary.
#[derive(Debug, Clone)]
pub struct TextSplits {
    pub vocabulary: Vocabulary,
    pub train: TokenText,
    pub val: TokenText,
}

/// Loads the training text and the validation text that `val` names, each long enough for one
/// window of `context + 1` characters.
///
/// The vocabulary comes from the whole `train_text` file (both parts, where the validation part
/// is its last fraction, as nanoGPT does), so that part never holds a character outside it; a
/// validation file of its own that does is an error naming the file, the character and its
/// byte offset. Every error names the file at fault.
pub fn load_text(train_text: &Path, val: ValSource<'_>, context: usize) -> Result<TextSplits> {
    let text = read_text(train_text)?;
    let vocabulary =
        Vocabulary::from_text(&text).map_err(|e| Error::data(train_text, e.to_string()))?;
    let tokens = vocabulary
        .encode(&text)
        .map_err(|e| Error::data(train_text, e.to_string()))?;
    drop(text);
    let (train, val) = match val {
        ValSource::Text(val_text) => {
            check_windows(train_text, "", &tokens, context)?;
            let whose = format!(" of the training text {}", train_text.display());
            let val = encode_file(&vocabulary, val_text, &whose)?;
            check_windows(val_text, "", &val, context)?;
            (tokens, val)
        }
        ValSource::Fraction(fraction) => {
            let (train, val) = split_off_fraction(train_text, tokens, fraction)?;
            let (first, last) = parts(fraction);
            check_windows(train_text, &first, &train, context)?;
            check_windows(train_text, &last, &val, context)?;
            (train, val)
        }
    };
    Ok(TextSplits {
        vocabulary,
        train: TokenText::new(train),
        val: TokenText::new(val),
    })
}

/// Encodes the text at `path` with a vocabulary it did not make (a run's saved one, for eval and
/// sampling): a character outside it is an error naming the file, the character and its byte
/// offset, as is a text too short for one window of `context + 1` characters.
pub fn load_with(vocabulary: &Vocabulary, path: &Path, context: usize) -> Result<TokenText> {
    let tokens = encode_file(vocabulary, path, "")?;
    check_windows(path, "", &tokens, context)?;
    Ok(TokenText::new(tokens))
}

/// The token ids of the text at `path`; `whose` ends the message of an unknown character.
fn encode_file(vocabulary: &Vocabulary, path: &Path, whose: &str) -> Result<Vec<u16>> {
    let text = read_text(path)?;
    vocabulary
        .encode(&text)
        .map_err(|e| Error::data(path, format!("{e}{whose}")))
}

/// `tokens` cut before its last `fraction` (rounded to whole characters): (train, validation).
fn split_off_fraction(
    path: &Path,
    mut tokens: Vec<u16>,
    fraction: f64,
) -> Result<(Vec<u16>, Vec<u16>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::data(
            path,
            format!(
                "cannot split off a validation fraction of {}: it must lie strictly between 0 \
                 and 1",
                crate::number(fraction)
            ),
        ));
    }
    let val_len = ((tokens.len() as f64 * fraction).round() as usize).min(tokens.len());
    let val = tokens.split_off(tokens.len() - val_len);
    Ok((tokens, val))
}

/// How messages name the two parts of a text split by `fraction`.
fn parts(fraction: f64) -> (String, String) {
    let fraction = crate::number(fraction);
    (
        format!("the training part (before the last {fraction}) "),
        format!("the validation part (the last {fraction}) "),
    )
}

/// Refuses `tokens` (of the file at `path`, the part of it that `part` names) where one window
/// of `context + 1` tokens does not fit.
fn check_windows(path: &Path, part: &str, tokens: &[u16], context: usize) -> Result<()> {
    match tokens.len().saturating_sub(context) {
        0 => Err(Error::data(
            path,
            format!("{part}holds {}", too_short(tokens.len(), context)),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn vocabulary(text: &str) -> Vocabulary {
        Vocabulary::from_text(text).unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// A folder of test files, written by name.
    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Self {
            Files(tempfile::tempdir().unwrap())
        }

        fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    fn refusal(result: Result<impl std::fmt::Debug>) -> String {
        let error = result.unwrap_err();
        assert!(error.is_bad_input(), "{error}");
        error.to_string()
    }

    /// A random string of `len` characters drawn from ASCII, Latin-1, combining marks, CJK and
    /// four-byte emoji, so that chunks cut inside characters of every width.
    fn random_text(rng: &mut ChaCha8Rng, len: usize) -> String {
        let pools: [&[char]; 5] = [
            &['a', 'b', 'z', ' ', '\n', '!', '\0', '\t'],
            &['é', 'ß', 'ñ', 'Ø'],
            &['\u{301}', '\u{308}'],
            &['中', '文', '字', '\u{ffff}'],
            &['😀', '🦀', '\u{10ffff}', '𝄞'],
        ];
        (0..len)
            .map(|_| {
                let pool = pools[rng.random_range(0..pools.len())];
                pool[rng.random_range(0..pool.len())]
            })
            .collect()
    }

    #[test]
    fn the_vocabulary_is_the_sorted_distinct_characters() {
        let v = vocabulary("hello, world\nhello");
        assert_eq!(
            v.chars(),
            &['\n', ' ', ',', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
        );
        assert_eq!(v.len(), 10);
        assert_eq!(v.encode("hello").unwrap(), vec![5, 4, 6, 6, 7]);
        assert_eq!(v.decode(&[5, 4, 6, 6, 7, 1, 9]), "hello w");
        // Ids past the vocabulary decode as the replacement character, not a panic.
        assert_eq!(v.decode(&[0, 10, u16::MAX]), "\n\u{fffd}\u{fffd}");
        assert!(vocabulary("").is_empty());
        // Code point order, as Python's sorted(set(text)).
        assert_eq!(vocabulary("😀éaZ").chars(), &['Z', 'a', 'é', '😀']);
    }

    /// Property: decode(encode(s)) == s, and the encoding cut into chunks of any size (inside
    /// characters of every width) is the one of a plain character-by-character lookup.
    #[test]
    fn encode_and_decode_round_trip_on_random_text() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for case in 0..200 {
            let len = rng.random_range(1..300);
            let text = random_text(&mut rng, len);
            let v = vocabulary(&text);
            let sorted: Vec<char> = {
                let mut chars: Vec<char> = text.chars().collect();
                chars.sort_unstable();
                chars.dedup();
                chars
            };
            assert_eq!(v.chars(), sorted.as_slice(), "case {case}");
            let expected: Vec<u16> = text
                .chars()
                .map(|c| sorted.binary_search(&c).unwrap() as u16)
                .collect();
            let chunk = rng.random_range(1..40);
            assert_eq!(v.encode_in_chunks(&text, chunk).unwrap(), expected);
            assert_eq!(
                Vocabulary::from_text_in_chunks(&text, chunk).unwrap(),
                v,
                "case {case}"
            );
            assert_eq!(v.encode(&text).unwrap(), expected);
            assert_eq!(v.decode(&expected), text, "case {case}");
        }
    }

    #[test]
    fn an_unknown_character_is_named_with_its_byte_offset() {
        let v = vocabulary("abc");
        let unknown = v.encode("abcé").unwrap_err();
        assert_eq!(
            unknown,
            UnknownChar {
                character: 'é',
                byte: 3
            }
        );
        assert_eq!(
            unknown.to_string(),
            "'é' (U+00E9) at byte 3 is not in the vocabulary"
        );
        // Non-printing characters are escaped.
        assert_eq!(
            v.encode("a\u{301}").unwrap_err().to_string(),
            "'\\u{301}' (U+0301) at byte 1 is not in the vocabulary"
        );
        // Above the vocabulary's last character, and below it.
        assert_eq!(v.encode("ab😀").unwrap_err().byte, 2);
        assert_eq!(v.encode("\n").unwrap_err().character, '\n');
        // Unknown characters in many chunks: the first one in the text is reported.
        let text = format!("{}é{}ü{}", "ab".repeat(100), "c".repeat(50), "ß".repeat(10));
        for chunk in [1, 3, 7, 64, 1 << 20] {
            assert_eq!(
                v.encode_in_chunks(&text, chunk).unwrap_err(),
                UnknownChar {
                    character: 'é',
                    byte: 200
                },
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_vocabulary_file_round_trips() {
        let files = Files::new();
        let path = files.0.path().join("vocabulary.json");
        for text in ["hello world\n", "😀é\u{0}\u{10ffff}\"\\ a"] {
            let v = vocabulary(text);
            v.save(&path).unwrap();
            assert_eq!(Vocabulary::load(&path).unwrap(), v);
        }
        assert_json_shape(&path);
    }

    /// The file is the JSON documented on [`Vocabulary`].
    fn assert_json_shape(path: &Path) {
        vocabulary("ba\n").save(path).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"chars": ["\n", "a", "b"]}));
    }

    #[test]
    fn hostile_vocabulary_files_are_refused_naming_the_file() {
        let files = Files::new();
        let cases: [(&str, &[u8], &str); 10] = [
            ("empty", b"", "not a vocabulary file: EOF while parsing"),
            (
                "no-chars",
                b"{\"chars\": []}",
                "the vocabulary holds no character",
            ),
            (
                "twice",
                b"{\"chars\": [\"a\", \"b\", \"b\"]}",
                "'b' (U+0062) appears twice",
            ),
            (
                "unsorted",
                b"{\"chars\": [\"b\", \"a\"]}",
                "characters out of order: 'b' (U+0062) before 'a' (U+0061)",
            ),
            ("not-json", b"abc", "not a vocabulary file: expected value"),
            (
                "two-chars",
                b"{\"chars\": [\"ab\"]}",
                "expected a character",
            ),
            (
                "lone-surrogate",
                b"{\"chars\": [\"\\ud800\"]}",
                "not a vocabulary file",
            ),
            ("missing-field", b"{}", "missing field `chars`"),
            (
                "extra-field",
                b"{\"chars\": [\"a\"], \"ids\": [0]}",
                "unknown field `ids`",
            ),
            ("a-list", b"[\"a\"]", "not a vocabulary file"),
        ];
        for (name, bytes, expected) in cases {
            let path = files.write(name, bytes);
            let error = refusal(Vocabulary::load(&path));
            assert!(
                error.starts_with(&format!("{}: ", path.display())) && error.contains(expected),
                "{name}: {error}"
            );
        }
        // One more character than 16-bit ids (with one kept as a marker) hold.
        let too_many: Vec<char> = (0..=MAX_VOCABULARY as u32)
            .filter_map(|c| char::from_u32(c + 0x1_0000))
            .collect();
        let json = serde_json::json!({ "chars": too_many }).to_string();
        let error = refusal(Vocabulary::load(&files.write("too-many", json)));
        assert!(
            error.contains("65536 distinct characters, more than the 65,535 a vocabulary may hold"),
            "{error}"
        );
        let huge = [
            b"{\"chars\": [\"a\"]".as_slice(),
            &vec![b' '; 5 << 20],
            b"}",
        ]
        .concat();
        let error = refusal(Vocabulary::load(&files.write("huge", huge)));
        assert!(error.ends_with("larger than 4 MiB, more than any vocabulary file takes"));
        let error = refusal(Vocabulary::load(&files.0.path().join("gone")));
        assert!(
            error.ends_with("gone: vocabulary file not found"),
            "{error}"
        );
        let error = refusal(Vocabulary::load(Path::new("/dev/zero")));
        assert_eq!(
            error,
            "/dev/zero: is a character device, not a regular file"
        );
    }

    #[test]
    fn a_text_of_more_than_65535_distinct_characters_is_refused() {
        assert_eq!(MAX_VOCABULARY, 65_535);
        let distinct = |count: usize| -> String {
            (0x1_0000u32..)
                .filter_map(char::from_u32)
                .take(count)
                .collect()
        };
        let v = vocabulary(&distinct(MAX_VOCABULARY));
        assert_eq!(v.len(), MAX_VOCABULARY);
        let text = distinct(MAX_VOCABULARY);
        let ids = v.encode(&text).unwrap();
        assert_eq!(ids.last(), Some(&(u16::MAX - 1)));
        assert_eq!(v.decode(&ids), text);
        assert_eq!(
            Vocabulary::from_text(&distinct(MAX_VOCABULARY + 1)),
            Err(TooManyChars { distinct: 65_536 })
        );
    }

    #[test]
    fn gzip_and_plain_files_give_the_same_text() {
        let files = Files::new();
        let text = "First line\nsecond: é, 中文, 😀\n".repeat(50);
        let plain = files.write("plain.txt", &text);
        let packed = files.write("packed.txt.gz", gzip(text.as_bytes()));
        // Several members, split inside a multi-byte character, as pigz and bgzip write them.
        let cut = text.find('中').unwrap() + 1;
        let (a, b) = text.as_bytes().split_at(cut);
        let members = files.write("members.gz", [gzip(a), gzip(b)].concat());
        for path in [&plain, &packed, &members] {
            assert_eq!(read_text(path).unwrap(), text, "{}", path.display());
        }
    }

    #[test]
    fn invalid_utf8_is_named_by_the_offset_of_its_first_byte() {
        let files = Files::new();
        let mut bytes = vec![b'a'; 1000];
        bytes.push(0xff);
        bytes.extend(b"more text");
        let plain = files.write("bad.txt", &bytes);
        assert_eq!(
            refusal(read_text(&plain)),
            format!("{}: invalid UTF-8 at byte 1000", plain.display())
        );
        let packed = files.write("bad.txt.gz", gzip(&bytes));
        assert_eq!(
            refusal(read_text(&packed)),
            format!(
                "{}: invalid UTF-8 at byte 1000 of the decompressed text",
                packed.display()
            )
        );
        // A character cut short at the end, and a surrogate encoded as UTF-8 (CESU-8).
        let cut = [b"abcd\xc3\xa9".as_slice(), b"\xc3"].concat();
        assert!(refusal(read_text(&files.write("cut.txt", cut))).ends_with("at byte 6"));
        let surrogate = b"ab\xed\xa0\x80";
        assert!(refusal(read_text(&files.write("cesu.txt", surrogate))).ends_with("at byte 2"));
    }

    #[test]
    fn a_file_that_holds_no_text_is_refused() {
        let files = Files::new();
        let empty = files.write("empty.txt", b"");
        assert_eq!(
            refusal(read_text(&empty)),
            format!("{}: holds no text", empty.display())
        );
        let empty_gzip = files.write("empty.txt.gz", gzip(b""));
        assert!(refusal(read_text(&empty_gzip)).ends_with(": holds no text"));
        // Whitespace is text: a model can learn it.
        assert_eq!(read_text(&files.write("blank.txt", b"\n")).unwrap(), "\n");
    }

    /// A gzip bomb stops once past the limit, not after filling memory (here a limit of 1 MiB).
    #[test]
    fn text_past_the_limit_is_refused_as_it_inflates() {
        let files = Files::new();
        let limit = TextLimit {
            bytes: 1 << 20,
            why: "the most a test file may hold".into(),
        };
        let bomb = files.write("bomb.gz", gzip(&vec![b'a'; 8 << 20]));
        assert!(
            refusal(read_text_within(&bomb, &limit))
                .ends_with("bomb.gz: more than 1 MiB of text, the most a test file may hold")
        );
        let exact = files.write("exact.txt", vec![b'a'; 1 << 20]);
        assert_eq!(read_text_within(&exact, &limit).unwrap().len(), 1 << 20);
        let over = files.write("over.txt", vec![b'a'; (1 << 20) + 1]);
        assert!(read_text_within(&over, &limit).is_err());

        let gib = 1u64 << 30;
        let limited = text_limit(Some(6 * gib));
        assert_eq!(limited.bytes, 6 * gib / 4);
        assert_eq!(
            format!("more than {} of text, {}", size(limited.bytes), limited.why),
            "more than 1.5 GiB of text, a quarter of the 6 GiB this process may use, as loading \
             takes about four times the text's size"
        );
        assert_eq!(text_limit(None).bytes, TEXT_LIMIT);
        assert_eq!(text_limit(Some(1024 * gib)).bytes, TEXT_LIMIT);
        assert_eq!(size(TEXT_LIMIT), "64 GiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(100), "100 bytes");
    }

    #[test]
    fn corrupt_gzip_fifos_devices_and_missing_files_are_refused() {
        let files = Files::new();
        let mut corrupt = gzip("some text, long enough to corrupt".repeat(20).as_bytes());
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        corrupt.truncate(middle + 1);
        let error = refusal(read_text(&files.write("corrupt.gz", corrupt)));
        assert!(error.contains("corrupt gzip stream"), "{error}");

        use crate::files::testing::{mkfifo, within_10_s};
        let fifo = mkfifo(&files.0.path().join("text.txt"));
        let error = within_10_s(move || read_text(&fifo).unwrap_err().to_string());
        assert!(
            error.ends_with("text.txt: is a FIFO (named pipe), not a regular file"),
            "{error}"
        );
        assert_eq!(
            refusal(read_text(Path::new("/dev/zero"))),
            "/dev/zero: is a character device, not a regular file"
        );
        let error = refusal(read_text(&files.0.path().join("gone.txt")));
        assert!(
            error.ends_with("gone.txt: dataset file not found"),
            "{error}"
        );
    }

    /// 100 characters split by 0.1: the first 90 train, the last 10 validate; the vocabulary
    /// holds the characters of both.
    #[test]
    fn a_fraction_splits_the_text_on_its_last_characters() {
        let files = Files::new();
        // 90 ASCII characters, then 10 multi-byte ones that appear nowhere else.
        let text = format!("{}{}", "abcdefghi\n".repeat(9), "é😀".repeat(5));
        assert_eq!(text.chars().count(), 100);
        let path = files.write("text.txt", &text);
        let splits = load_text(&path, ValSource::Fraction(0.1), 4).unwrap();
        assert_eq!((splits.train.len(), splits.val.len()), (90, 10));
        assert_eq!(splits.vocabulary.len(), 12);
        let v = &splits.vocabulary;
        assert_eq!(v.decode(splits.train.tokens()), "abcdefghi\n".repeat(9));
        assert_eq!(v.decode(splits.val.tokens()), "é😀".repeat(5));
        // Rounded to whole characters: 100 * 0.333 = 33.3 leaves 33 to validate.
        for (fraction, train, val) in [(0.25, 75, 25), (0.333, 67, 33), (0.9, 10, 90)] {
            let splits = load_text(&path, ValSource::Fraction(fraction), 4).unwrap();
            assert_eq!(
                (splits.train.len(), splits.val.len()),
                (train, val),
                "{fraction}"
            );
        }
    }

    #[test]
    fn fractions_outside_zero_and_one_are_refused() {
        let files = Files::new();
        let path = files.write("text.txt", "abcdefghij".repeat(10));
        for fraction in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            let error = refusal(load_text(&path, ValSource::Fraction(fraction), 4));
            assert!(
                error.contains("must lie strictly between 0 and 1"),
                "{fraction}: {error}"
            );
        }
    }

    #[test]
    fn parts_too_short_for_one_window_are_refused_naming_which() {
        let files = Files::new();
        let path = files.write("text.txt", "abcdefghij".repeat(10));
        // Context 9 needs 10 characters: the last 0.1 of 100 holds exactly that.
        load_text(&path, ValSource::Fraction(0.1), 9).unwrap();
        let error = refusal(load_text(&path, ValSource::Fraction(0.1), 10));
        assert_eq!(
            error,
            format!(
                "{}: the validation part (the last 0.1) holds 10 characters, fewer than the 11 \
                 one window of context 10 takes (its characters and the next one)",
                path.display()
            )
        );
        let error = refusal(load_text(&path, ValSource::Fraction(0.95), 10));
        assert!(
            error.contains(": the training part (before the last 0.95) holds 5 characters"),
            "{error}"
        );
        let short = files.write("short.txt", "abc");
        let error = refusal(load_text(&path, ValSource::Text(&short), 3));
        assert!(
            error.ends_with(
                "short.txt: holds 3 characters, fewer than the 4 one window of \
                 context 3 takes (its characters and the next one)"
            ),
            "{error}"
        );
        let error = refusal(load_text(&short, ValSource::Text(&path), 3));
        assert!(error.contains("short.txt: holds 3 characters"), "{error}");
        load_text(&path, ValSource::Text(&short), 2).unwrap();
        // A context that overflows `context + 1` is refused, not wrapped.
        let error = refusal(load_with(&vocabulary("abc"), &short, usize::MAX));
        assert!(error.contains(&format!("fewer than the {}", usize::MAX as u128 + 1)));
    }

    #[test]
    fn a_validation_file_with_a_character_the_training_text_lacks_is_refused() {
        let files = Files::new();
        let train = files.write("train.txt", "the cat sat on the mat\n");
        let val = files.write("val.txt", "the hat\nthe cät\n");
        let error = refusal(load_text(&train, ValSource::Text(&val), 2));
        assert_eq!(
            error,
            format!(
                "{}: 'ä' (U+00E4) at byte 13 is not in the vocabulary of the training text {}",
                val.display(),
                train.display()
            )
        );
        // The vocabulary is the training file's alone: 'h' is in it, so is every char of val.
        let fine = files.write("fine.txt", "the hat\n");
        let splits = load_text(&train, ValSource::Text(&fine), 2).unwrap();
        assert_eq!(splits.vocabulary, vocabulary("the cat sat on the mat\n"));
        assert_eq!(splits.train.len(), 23);
        assert_eq!(splits.vocabulary.decode(splits.val.tokens()), "the hat\n");
    }

    #[test]
    fn load_with_encodes_a_text_with_a_saved_vocabulary() {
        let files = Files::new();
        let v = vocabulary("abc\n");
        let text = load_with(&v, &files.write("ok.txt.gz", gzip(b"cab\nab")), 3).unwrap();
        assert_eq!(text.tokens(), &[3, 1, 2, 0, 1, 2]);
        let bad = files.write("bad.txt", "ab\ncd");
        assert_eq!(
            refusal(load_with(&v, &bad, 2)),
            format!(
                "{}: 'd' (U+0064) at byte 4 is not in the vocabulary",
                bad.display()
            )
        );
        let error = refusal(load_with(&v, &files.write("two.txt", "ab"), 2));
        assert!(error.ends_with(
            "two.txt: holds 2 characters, fewer than the 3 one window of \
             context 2 takes (its characters and the next one)"
        ));
    }

    #[test]
    fn windows_count_the_positions_that_fit() {
        let text = TokenText::new((0..10).collect());
        assert_eq!(text.windows(3), Ok(7));
        assert_eq!(text.windows(9), Ok(1));
        assert_eq!(
            text.windows(10),
            Err(TooShort {
                tokens: 10,
                context: 10
            })
        );
        assert_eq!(
            text.windows(10).unwrap_err().to_string(),
            "10 characters, fewer than the 11 one window of context 10 takes (its characters and \
             the next one)"
        );
        assert!(TokenText::new(Vec::new()).windows(0).is_err());
    }

    fn ids(tensor: Tensor<2, Int>) -> (Vec<usize>, Vec<i64>) {
        let dims = tensor.dims().to_vec();
        (dims, tensor.into_data().try_to_vec_as::<i64>().unwrap())
    }

    #[test]
    fn a_batch_holds_windows_and_their_next_tokens() {
        let v = vocabulary("abcdefgh");
        let text = TokenText::new(v.encode("abcdefghhgfedcba").unwrap());
        let device = Device::default();
        let (inputs, targets) = text.batch(&[0, 3, 12], 3, &device);
        assert_eq!(ids(inputs), (vec![3, 3], vec![0, 1, 2, 3, 4, 5, 3, 2, 1]));
        assert_eq!(ids(targets), (vec![3, 3], vec![1, 2, 3, 4, 5, 6, 2, 1, 0]));
        // Targets are the inputs shifted by one, at every position.
        let windows = text.windows(5).unwrap();
        let positions: Vec<usize> = (0..windows).collect();
        let (inputs, targets) = text.windows_at(&positions, 5);
        for (row, &p) in positions.iter().enumerate() {
            let tokens: Vec<i64> = text.tokens()[p..p + 6].iter().map(|&t| t as i64).collect();
            assert_eq!(&inputs[row * 5..(row + 1) * 5], &tokens[..5]);
            assert_eq!(&targets[row * 5..(row + 1) * 5], &tokens[1..]);
        }
        let (inputs, _) = text.batch(&[], 4, &device);
        assert_eq!(ids(inputs), (vec![0, 4], vec![]));
    }

    #[test]
    #[should_panic(expected = "the window of context 3 at 13 runs past the text's 16 tokens")]
    fn a_batch_past_the_last_window_panics_naming_it() {
        let text = TokenText::new(vec![0; 16]);
        text.batch(&[12, 13], 3, &Device::default());
    }

    #[test]
    fn evaluation_positions_are_fixed_and_spread_evenly() {
        // 104 tokens, context 4: 100 windows, at 0..=99.
        let text = TokenText::new(vec![0; 104]);
        assert_eq!(text.evaluation_positions(4, 5), vec![0, 24, 49, 74, 99]);
        assert_eq!(text.evaluation_positions(4, 2), vec![0, 99]);
        assert_eq!(text.evaluation_positions(4, 1), vec![0]);
        assert_eq!(text.evaluation_positions(4, 0), Vec::<usize>::new());
        let every: Vec<usize> = (0..100).collect();
        assert_eq!(text.evaluation_positions(4, 100), every);
        assert_eq!(text.evaluation_positions(4, 1000), every);
        assert_eq!(text.evaluation_positions(104, 8), Vec::<usize>::new());
        for count in [3, 7, 33, 99] {
            let positions = text.evaluation_positions(4, count);
            assert_eq!(positions, text.evaluation_positions(4, count));
            assert_eq!(positions.len(), count);
            assert_eq!((positions[0], positions[count - 1]), (0, 99));
            let gaps: Vec<usize> = positions.windows(2).map(|p| p[1] - p[0]).collect();
            let (low, high) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
            assert!(*low >= 1 && high - low <= 1, "{count}: {gaps:?}");
        }
    }

    /// Encoding and the vocabulary's scan give the same bits in pools of 1 and 3 threads, with
    /// chunks small enough that every thread takes many.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let text = random_text(&mut rng, 20_000);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let v = Vocabulary::from_text_in_chunks(&text, 97).unwrap();
                let tokens = v.encode_in_chunks(&text, 97).unwrap();
                let unknown = vocabulary("ab").encode_in_chunks(&text, 97).unwrap_err();
                (v, tokens, unknown)
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one.0, vocabulary(&text));
        assert_eq!(one.1, one.0.encode(&text).unwrap());
    }

    /// The shipped dataset: 1,127,215 ASCII characters, 80 distinct, split 0.9 / 0.1 as nanoGPT
    /// does (its train part is int(n * 0.9) characters).
    #[test]
    fn the_shipped_shakespeare_text_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/shakespeare8.txt.gz");
        let splits = load_text(&path, ValSource::Fraction(0.1), 256).unwrap();
        let v = &splits.vocabulary;
        assert_eq!(v.len(), 80);
        assert_eq!(
            v.chars().iter().collect::<String>(),
            "\n !\"&'(),-./123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz{}"
        );
        assert_eq!((splits.train.len(), splits.val.len()), (1_014_493, 112_722));
        let text = read_text(&path).unwrap();
        assert_eq!(text.len(), 1_127_215);
        let whole = [splits.train.tokens(), splits.val.tokens()].concat();
        assert_eq!(v.decode(&whole), text);
        assert_eq!(splits.train.windows(256), Ok(1_014_493 - 256));
    }
}
