//! The byte-level rules of the XKS Encrypt/Decrypt contract that sit around
//! AES-GCM: how the AAD handed to the HSM is built, what `ciphertextMetadata`
//! this proxy emits, and the Ciphertext Data Integrity Value (CDIV).
//!
//! These are pure functions so they can be tested against the spec's own
//! numbers (Appendix C) without an HSM.

use ring::digest;

/// GCM tag length in bytes; the spec allows only 128-bit tags.
pub const TAG_LEN: usize = 16;
/// IV length this proxy generates (96 bits, the GCM standard size).
pub const IV_LEN: usize = 12;
/// Largest `ciphertextMetadata` the spec allows, in bytes.
pub const MAX_METADATA_LEN: usize = 20;
/// Largest AAD the length-prefixed construction can express (u16 length).
pub const MAX_AAD_LEN: usize = u16::MAX as usize;

/// Format byte of metadata layout 1: `[0x01]`, "the HSM's AAD is the spec's
/// length-prefixed construction and the key is the one named in the URI"
/// (version 0 of the external key).
pub const METADATA_FORMAT_V1: u8 = 0x01;
/// Format byte of metadata layout 2: `[0x02, version as u32 big-endian]`,
/// "encrypted under that version of the external key" (see `keys rotate`).
pub const METADATA_FORMAT_V2: u8 = 0x02;

/// The metadata this proxy returns from an Encrypt under `version` of a key.
/// Version 0 keeps layout 1, so ciphertexts of keys never rotated look
/// exactly as they always did. 5 bytes at most, well inside the spec's 20.
pub fn metadata_for_version(version: u32) -> Vec<u8> {
    if version == 0 {
        vec![METADATA_FORMAT_V1]
    } else {
        let mut m = Vec::with_capacity(5);
        m.push(METADATA_FORMAT_V2);
        m.extend_from_slice(&version.to_be_bytes());
        m
    }
}

/// The key version a ciphertext's metadata names. Anything that is not layout
/// 2 (no metadata, layout 1, or bytes another proxy wrote) means the base key:
/// the metadata is bound into the GCM tag, so a wrong guess cannot decrypt
/// anything, and ciphertexts from before versioning keep working.
pub fn version_from_metadata(metadata: &[u8]) -> u32 {
    match metadata {
        [METADATA_FORMAT_V2, a, b, c, d] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// The PKCS#11 label of `version` of external key `id`: the id itself for
/// version 0, `id#N` after. `#` cannot occur in an external key id, so a
/// version label never collides with another key's id, and it cannot be
/// addressed through the API directly.
pub fn version_label(id: &str, version: u32) -> String {
    if version == 0 {
        id.to_string()
    } else {
        format!("{id}#{version}")
    }
}

/// Builds the AAD given to the HSM:
/// `u16_be(len(aad)) || aad || u8(len(metadata)) || metadata`.
///
/// The lengths matter: without them a caller could move the metadata bytes into
/// the AAD (or back) and still decrypt. The caller checks the size limits first;
/// this function only asserts them in debug builds.
pub fn hsm_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    debug_assert!(aad.len() <= MAX_AAD_LEN);
    debug_assert!(metadata.len() <= MAX_METADATA_LEN);
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    out.extend_from_slice(&(aad.len() as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// True for metadata this proxy writes (layout 1 or 2). Such a ciphertext is
/// only ever decrypted with this proxy's own AAD construction.
pub fn is_own_metadata(metadata: &[u8]) -> bool {
    matches!(
        metadata,
        [METADATA_FORMAT_V1] | [METADATA_FORMAT_V2, _, _, _, _]
    )
}

/// How the AAD handed to the HSM is built from the request's AAD and
/// ciphertext metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AadLayout {
    /// The spec's construction, [`hsm_aad`]: what this proxy always encrypts with.
    Spec,
    /// The AWS sample proxy's (`aws-samples/aws-kms-xks-proxy`):
    /// `u16_be(len(aad)) || SHA-256(aad) || u8(len(metadata)) || metadata`,
    /// the digest only when the request carried the AAD field (even empty).
    /// Only ever used to decrypt what the sample wrote, on key stores that
    /// opted in (see [`SampleCompat`]).
    AwsSample,
}

impl AadLayout {
    /// The HSM's AAD under this layout; `aad` is `None` when the request had
    /// no `additionalAuthenticatedData` field.
    pub fn hsm_aad(self, aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
        match self {
            AadLayout::Spec => hsm_aad(aad.unwrap_or_default(), metadata),
            AadLayout::AwsSample => {
                let aad_len = aad.map_or(0, <[u8]>::len);
                debug_assert!(aad_len <= MAX_AAD_LEN);
                debug_assert!(metadata.len() <= MAX_METADATA_LEN);
                let mut out = Vec::with_capacity(2 + 32 + 1 + metadata.len());
                out.extend_from_slice(&(aad_len as u16).to_be_bytes());
                if let Some(aad) = aad {
                    out.extend_from_slice(digest::digest(&digest::SHA256, aad).as_ref());
                }
                out.push(metadata.len() as u8);
                out.extend_from_slice(metadata);
                out
            }
        }
    }
}

/// A key store that took over from the AWS sample proxy: its Decrypt also
/// accepts the sample's ciphertexts (see [`decrypt_layouts`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SampleCompat {
    /// The sample's static `server.ciphertext_metadata_b64`, decoded, if it
    /// had one. Then only ciphertexts with exactly this metadata (or none,
    /// from before it was set) are tried the sample's way.
    pub metadata: Option<Vec<u8>>,
}

/// The layouts to try, in order, to decrypt a ciphertext with this metadata.
///
/// A ciphertext carrying this proxy's own metadata is only ever tried this
/// proxy's way: no downgrade. Where the key store opted in, any other is
/// tried the sample's way first (that is where such ciphertexts come from
/// once a key store migrated), then the spec's: one extra HSM call at most,
/// and none where the two constructions coincide (no AAD field at all).
pub fn decrypt_layouts(
    metadata: &[u8],
    aad_present: bool,
    compat: Option<&SampleCompat>,
) -> &'static [AadLayout] {
    const SPEC: &[AadLayout] = &[AadLayout::Spec];
    const BOTH: &[AadLayout] = &[AadLayout::AwsSample, AadLayout::Spec];
    let Some(compat) = compat else { return SPEC };
    if is_own_metadata(metadata) || !aad_present {
        return SPEC;
    }
    match &compat.metadata {
        Some(m) if !metadata.is_empty() && metadata != m.as_slice() => SPEC,
        _ => BOTH,
    }
}

/// CDIV per Appendix C: SHA-256 over the decoded
/// `aad || metadata || iv || ciphertext || tag`, no lengths.
pub fn cdiv_sha256(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        ctx.update(part);
    }
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_metadata_round_trips() {
        use super::*;
        assert_eq!(metadata_for_version(0), vec![0x01]);
        assert_eq!(metadata_for_version(7), vec![0x02, 0, 0, 0, 7]);
        for v in [0, 1, 2, 300, u32::MAX] {
            assert_eq!(version_from_metadata(&metadata_for_version(v)), v);
        }
        assert_eq!(version_from_metadata(&[]), 0);
        assert_eq!(version_from_metadata(&[0x02, 1]), 0);
        assert_eq!(version_from_metadata(b"other proxy"), 0);
        assert_eq!(version_label("k", 0), "k");
        assert_eq!(version_label("k", 3), "k#3");
    }

    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    /// The worked example of the spec's Appendix C.
    #[test]
    fn appendix_c_cdiv_example() {
        let aad = b"project=nile,department=marketing";
        let metadata = b"key_version=1";
        let iv = B64.decode("HMrlRw85cAJUd5Ax").unwrap();
        let ct = B64.decode("ghxkK1txeDNn3q8Y").unwrap();
        let tag = B64.decode("vBxN2ncH1oEkR8WVXpmyYQ==").unwrap();
        assert_eq!(aad.len(), 33);
        assert_eq!(metadata.len(), 13);
        assert_eq!(B64.encode(metadata), "a2V5X3ZlcnNpb249MQ==");
        let cdiv = cdiv_sha256(aad, metadata, &iv, &ct, &tag);
        let hex: String = cdiv.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
        );
        assert_eq!(
            B64.encode(cdiv),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    #[test]
    fn aws_sample_layout() {
        // No AAD field: both constructions are the same bytes.
        assert_eq!(
            AadLayout::AwsSample.hsm_aad(None, b""),
            AadLayout::Spec.hsm_aad(None, b"")
        );
        // An empty AAD field is hashed by the sample.
        let sample = AadLayout::AwsSample.hsm_aad(Some(b""), b"v1");
        assert_eq!(&sample[..2], &[0, 0]);
        assert_eq!(
            &sample[2..34],
            digest::digest(&digest::SHA256, b"").as_ref()
        );
        assert_eq!(&sample[34..], &[2, b'v', b'1']);
        let sample = AadLayout::AwsSample.hsm_aad(Some(b"abc"), b"");
        assert_eq!(&sample[..2], &[0, 3]);
        assert_eq!(sample.len(), 2 + 32 + 1);
        assert_ne!(sample, AadLayout::Spec.hsm_aad(Some(b"abc"), b""));
    }

    #[test]
    fn which_layouts_are_tried() {
        use AadLayout::*;
        let on = SampleCompat::default();
        let with_md = SampleCompat {
            metadata: Some(b"v0.0.1".to_vec()),
        };
        // Compat off: only ever the spec's.
        assert_eq!(decrypt_layouts(b"", true, None), &[Spec]);
        // Our own metadata: never the sample's.
        assert_eq!(decrypt_layouts(&[1], true, Some(&on)), &[Spec]);
        assert_eq!(decrypt_layouts(&[2, 0, 0, 0, 3], true, Some(&on)), &[Spec]);
        // No AAD field: the two coincide, one call.
        assert_eq!(decrypt_layouts(b"", false, Some(&on)), &[Spec]);
        // Anything else: the sample's first.
        assert_eq!(decrypt_layouts(b"", true, Some(&on)), &[AwsSample, Spec]);
        assert_eq!(decrypt_layouts(b"xyz", true, Some(&on)), &[AwsSample, Spec]);
        // With the sample's static metadata known, only it (or none).
        assert_eq!(
            decrypt_layouts(b"v0.0.1", true, Some(&with_md)),
            &[AwsSample, Spec]
        );
        assert_eq!(
            decrypt_layouts(b"", true, Some(&with_md)),
            &[AwsSample, Spec]
        );
        assert_eq!(decrypt_layouts(b"other", true, Some(&with_md)), &[Spec]);
        assert!(is_own_metadata(&[1]) && is_own_metadata(&[2, 0, 0, 0, 1]));
        assert!(!is_own_metadata(&[2, 0, 0, 1]) && !is_own_metadata(b""));
    }

    #[test]
    fn aad_is_length_prefixed() {
        assert_eq!(hsm_aad(b"", b""), vec![0, 0, 0]);
        assert_eq!(hsm_aad(b"ab", b"\x01"), vec![0, 2, b'a', b'b', 1, 1]);
        // Moving metadata into the AAD gives a different HSM AAD.
        assert_ne!(hsm_aad(b"", b"\x01"), hsm_aad(b"\x01", b""));
        let big = vec![7u8; 8192];
        let built = hsm_aad(&big, b"");
        assert_eq!(&built[..2], &[0x20, 0x00]);
        assert_eq!(built.len(), 8192 + 3);
    }
}
