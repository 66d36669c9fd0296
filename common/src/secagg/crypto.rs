//! The primitives, all from maintained libraries: X25519 (`x25519-dalek`), Shamir sharing
//! over Curve25519's scalar field (`vsss-rs`), HKDF-SHA256, ChaCha20-Poly1305 and ECDSA
//! P-256 (`ring`), ChaCha20 as the mask generator (`rand_chacha`). Nothing here is
//! hand-made cryptography; this module only fixes how the protocol uses them (labels,
//! what each key is bound to).

use curve25519_dalek::scalar::Scalar;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::signature::{self, KeyPair};
use vsss_rs::{DefaultShare, IdentifierPrimeField, ReadableShareSet};

use super::{Context, Fault, put};

/// A Shamir share: its point (the holder's index) and its value, both scalars.
pub(crate) type Share = DefaultShare<IdentifierPrimeField<Scalar>, IdentifierPrimeField<Scalar>>;

/// Signs with a site's certificate key.
pub trait Signer: Send + Sync {
    /// The signature of `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

/// Checks a site's signature against the key its certificate names.
pub trait Verifier: Send + Sync {
    /// Whether `signature` is `site`'s over `message`.
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool;
}

/// An ECDSA P-256 signing key (the kind fedflow certificates carry), with SHA-256 and
/// ASN.1 DER signatures (as X.509 and TLS carry them).
pub struct EcdsaSigner {
    key: signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for EcdsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcdsaSigner").finish_non_exhaustive()
    }
}

impl EcdsaSigner {
    /// The key in PKCS#8 DER (what a certificate bundle's `key.pem` holds).
    pub fn from_pkcs8(der: &[u8]) -> Result<EcdsaSigner, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            der,
            &rng,
        )
        .map_err(|e| format!("not an ECDSA P-256 PKCS#8 key: {e}"))?;
        Ok(EcdsaSigner { key, rng })
    }

    /// A new random key, and its PKCS#8 DER.
    pub fn generate() -> Result<(EcdsaSigner, Vec<u8>), String> {
        let rng = ring::rand::SystemRandom::new();
        let der = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .map_err(|e| format!("cannot make a key: {e}"))?;
        let der = der.as_ref().to_vec();
        Ok((EcdsaSigner::from_pkcs8(&der)?, der))
    }

    /// The public key, uncompressed (65 bytes), as [`EcdsaVerifier`] takes it.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

impl Signer for EcdsaSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }
}

/// Verifies ECDSA P-256 signatures against each site's public key (uncompressed), e.g. the
/// keys of the sites' certificates once their chains to the federation CA are checked.
#[derive(Debug, Clone, Default)]
pub struct EcdsaVerifier {
    keys: std::collections::HashMap<String, Vec<u8>>,
}

impl EcdsaVerifier {
    /// Trusts `public_key` as `site`'s.
    pub fn insert(&mut self, site: impl Into<String>, public_key: Vec<u8>) {
        self.keys.insert(site.into(), public_key);
    }
}

impl Verifier for EcdsaVerifier {
    fn verify(&self, site: &str, message: &[u8], sig: &[u8]) -> bool {
        self.keys.get(site).is_some_and(|k| {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, k)
                .verify(message, sig)
                .is_ok()
        })
    }
}

/// A uniform scalar from the operating system's generator (64 bytes reduced, so the bias
/// is below 2^-250).
pub(crate) fn random_scalar() -> Scalar {
    let mut wide = [0u8; 64];
    rand_crypto::RngExt::fill(&mut rand_crypto::rng(), &mut wide[..]);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// A scalar from its canonical bytes.
pub(crate) fn scalar(bytes: &[u8; 32]) -> Option<Scalar> {
    Option::from(Scalar::from_canonical_bytes(*bytes))
}

/// An X25519 secret key whose bytes are the scalar `s` (X25519 clamps them when used).
pub(crate) fn x25519_secret(s: &Scalar) -> x25519_dalek::StaticSecret {
    x25519_dalek::StaticSecret::from(s.to_bytes())
}

/// The X25519 secret `ours` shares with `theirs`, or `None` for a low-order public key
/// (which would make the secret predictable).
pub(crate) fn agree(ours: &x25519_dalek::StaticSecret, theirs: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = ours.diffie_hellman(&x25519_dalek::PublicKey::from(*theirs));
    shared.was_contributory().then(|| *shared.as_bytes())
}

/// 32 bytes from HKDF-SHA256 (RFC 5869) of `secret`, bound to `label`, the context and
/// `extra`.
pub(crate) fn derive(secret: &[u8], label: &str, ctx: &Context, extra: &[u8]) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let mut info = Vec::new();
    put(&mut info, label.as_bytes());
    put(&mut info, &ctx.encode());
    put(&mut info, extra);
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"fedflow-secagg/v1");
    let mut out = [0u8; 32];
    salt.extract(secret)
        .expand(&[&info], Len)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// Adds `sign ·` the mask expanded from `seed` to `values`, modulo `mask + 1`.
pub(crate) fn add_mask(values: &mut [u64], seed: [u8; 32], subtract: bool, mask: u64) {
    let mut prg = ChaCha20Rng::from_seed(seed);
    for v in values {
        let m = prg.next_u64() & mask;
        *v = if subtract {
            v.wrapping_sub(m)
        } else {
            v.wrapping_add(m)
        } & mask;
    }
}

/// The commitment to a self-mask secret.
pub(crate) fn commit(ctx: &Context, site: &str, secret: &Scalar) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"fedflow-secagg/v1 self-mask commitment");
    let mut m = Vec::new();
    put(&mut m, &ctx.encode());
    put(&mut m, site.as_bytes());
    h.update(&m);
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Shamir shares of `secret` at the points `indices` (each a site's 1-based index), any
/// `threshold` of which rebuild it.
pub(crate) fn split(
    secret: &Scalar,
    threshold: usize,
    indices: &[u64],
) -> Result<Vec<Share>, Fault> {
    let ids = indices
        .iter()
        .map(|&i| IdentifierPrimeField(Scalar::from(i)));
    vsss_rs::shamir::split_secret_with_ids::<Share>(
        threshold,
        indices.len(),
        &IdentifierPrimeField(*secret),
        rand_crypto::rng(),
        ids,
    )
    .map_err(|e| Fault::Protocol(format!("cannot share a secret: {e}")))
}

/// The secret the shares `(index, value)` rebuild (the caller checks there are enough).
pub(crate) fn combine(shares: &[(u64, Scalar)]) -> Result<Scalar, Fault> {
    let set: Vec<Share> = shares
        .iter()
        .map(|&(i, v)| Share {
            identifier: IdentifierPrimeField(Scalar::from(i)),
            value: IdentifierPrimeField(v),
        })
        .collect();
    set.combine()
        .map(|s| s.0)
        .map_err(|e| Fault::Protocol(format!("cannot rebuild a secret: {e}")))
}

/// ChaCha20-Poly1305 under a key used for this one message (so the nonce is fixed).
fn aead_key(key: &[u8; 32]) -> ring::aead::LessSafeKey {
    let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
        .expect("a 32-byte key is a ChaCha20-Poly1305 key");
    ring::aead::LessSafeKey::new(unbound)
}

/// Encrypts and authenticates `plain` under the one-message key `key`, binding `aad`.
pub(crate) fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut buf = plain.to_vec();
    aead_key(key)
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
            ring::aead::Aad::from(aad),
            &mut buf,
        )
        .expect("a share envelope is far below the ChaCha20-Poly1305 limit");
    buf
}

/// Opens what [`seal`] made, or `None` if it was made under another key or `aad`, or
/// changed.
pub(crate) fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let mut buf = sealed.to_vec();
    let plain = aead_key(key)
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
            ring::aead::Aad::from(aad),
            &mut buf,
        )
        .ok()?;
    Some(plain.to_vec())
}
