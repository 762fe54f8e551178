//! MD5 and the AES-128-CBC payload cipher of miio packets (PROTOCOL.md §2.2, §2.3).
//!
//! Contract: `K = MD5(secret)`, `IV = MD5(K ‖ secret)`, AES-128-CBC with PKCS#7 padding where
//! block-aligned input gets one full block of `10`. Every packet uses the same IV. Decryption
//! refuses ciphertext that is empty or not block-aligned, and plaintext whose padding is malformed.
//! Nothing here panics on any input. `Keys` never prints its secret or the derived key/IV.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use md5::{Digest, Md5};

use super::miio::Error;

/// AES block size in bytes.
const BLOCK: usize = 16;

/// MD5 over the concatenation of `parts`.
pub fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5Sum::default();
    for p in parts {
        h.update(p);
    }
    h.finish()
}

/// A streaming MD5 (miio_ota's file check, L§14) over the one copy of the digest's `update` and
/// `finalize` that [`md5`] uses too: kept out of line, so the binary carries them once.
#[derive(Default)]
pub struct Md5Sum(Md5);

impl Md5Sum {
    #[inline(never)]
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    #[inline(never)]
    pub fn finish(self) -> [u8; 16] {
        self.0.finalize().into()
    }
}

/// The 16-byte secret of one link (LAN token or cloud key, P§2.5) with its derived AES key and IV,
/// and the AES key schedule expanded once for the life of the secret: rebuilding it for every
/// packet was a tenth of the cost of a report.
#[derive(Clone)]
pub struct Keys {
    secret: [u8; 16],
    key: [u8; 16],
    iv: [u8; 16],
    aes: aes::Aes128,
}

// Everything else derives from the secret.
impl PartialEq for Keys {
    fn eq(&self, other: &Keys) -> bool {
        self.secret == other.secret
    }
}
impl Eq for Keys {}

// Secrets never reach a log line (P§2.5), so Debug shows only that keys are present.
impl core::fmt::Debug for Keys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    /// Derives K and IV from `secret` (P§2.3).
    pub fn new(secret: &[u8; 16]) -> Keys {
        let key = md5(&[secret]);
        let iv = md5(&[&key, secret]);
        Keys {
            secret: *secret,
            key,
            iv,
            aes: aes::Aes128::new(GenericArray::from_slice(&key)),
        }
    }

    /// The raw secret: the MD5 checksums mix it in (P§2.2).
    pub fn secret(&self) -> &[u8; 16] {
        &self.secret
    }

    /// `K = MD5(secret)`.
    pub fn key(&self) -> &[u8; 16] {
        &self.key
    }

    /// `IV = MD5(K ‖ secret)`.
    pub fn iv(&self) -> &[u8; 16] {
        &self.iv
    }

    /// AES-128-CBC with PKCS#7 padding; block-aligned input gets a full block of `10` (P§2.3).
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(plain.len() + BLOCK);
        buf.extend_from_slice(plain);
        self.encrypt_tail(&mut buf, 0);
        buf
    }

    /// [`Keys::encrypt`] in place: pads `buf[from..]` and encrypts it, leaving `buf[..from]` (a
    /// header) as it is, so a packet is built in one buffer with no copy of its payload.
    pub fn encrypt_tail(&self, buf: &mut Vec<u8>, from: usize) {
        let len = buf.len().saturating_sub(from);
        let pad = BLOCK - len % BLOCK;
        // pad is 1..=16, so the cast cannot truncate.
        buf.resize(buf.len() + pad, pad as u8);
        // CBC: each block is XORed with the previous ciphertext block (the IV for the first).
        // chunks_exact_mut yields exactly BLOCK bytes each, and the tail is a multiple of BLOCK.
        let mut prev = u128::from_ne_bytes(self.iv);
        for block in buf
            .get_mut(from..)
            .unwrap_or(&mut [])
            .chunks_exact_mut(BLOCK)
        {
            let Ok(b) = <&mut [u8; BLOCK]>::try_from(block) else {
                continue;
            };
            *b = (u128::from_ne_bytes(*b) ^ prev).to_ne_bytes();
            self.aes.encrypt_block(GenericArray::from_mut_slice(b));
            prev = u128::from_ne_bytes(*b);
        }
    }

    /// Inverse of [`Keys::encrypt`]. Empty or unaligned input gives `BadPayloadLength(n)`,
    /// malformed padding gives `BadPadding` (P§2.7 step 5).
    pub fn decrypt(&self, ct: &[u8]) -> Result<Vec<u8>, Error> {
        let mut buf = ct.to_vec();
        self.decrypt_tail(&mut buf, 0)?;
        Ok(buf)
    }

    /// [`Keys::decrypt`] in place: `buf[from..]` is the ciphertext and becomes the unpadded
    /// plaintext, `buf[..from]` (a header) stays, so a packet is opened in one buffer.
    pub fn decrypt_tail(&self, buf: &mut Vec<u8>, from: usize) -> Result<(), Error> {
        let n = buf.len().saturating_sub(from);
        if n == 0 || !n.is_multiple_of(BLOCK) {
            return Err(Error::BadPayloadLength(n));
        }
        let mut prev = u128::from_ne_bytes(self.iv);
        for block in buf
            .get_mut(from..)
            .unwrap_or(&mut [])
            .chunks_exact_mut(BLOCK)
        {
            let Ok(b) = <&mut [u8; BLOCK]>::try_from(block) else {
                continue;
            };
            let this = u128::from_ne_bytes(*b);
            self.aes.decrypt_block(GenericArray::from_mut_slice(b));
            *b = (u128::from_ne_bytes(*b) ^ prev).to_ne_bytes();
            prev = this;
        }
        let pad = usize::from(buf.last().copied().unwrap_or(0));
        if pad == 0 || pad > BLOCK {
            return Err(Error::BadPadding);
        }
        let keep = buf.len() - pad; // the tail is at least BLOCK >= pad bytes
        if !buf
            .get(keep..)
            .is_some_and(|t| t.iter().all(|&b| usize::from(b) == pad))
        {
            return Err(Error::BadPadding);
        }
        buf.truncate(keep);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn arr(s: &str) -> [u8; 16] {
        hex(s).try_into().unwrap()
    }

    /// The K/IV table of P§7.
    #[test]
    fn key_iv_table() {
        let rows: [([u8; 16], &str, &str); 4] = [
            (
                [0; 16],
                "4ae71336e44bf9bf79d2752e234818a5",
                "1e38275872be38346a6f072771a7f58b",
            ),
            (
                arr("00112233445566778899aabbccddeeff"),
                "6e8311168ee16d6aa1aa48c64145003c",
                "6f434fa9acd75da73e5fb999f641cda2",
            ),
            (
                *b"YWJjZGVmZ2hpamts",
                "d5385b48033e3a37d1eaebc2f7541a04",
                "b5dedfcb9dc8a251f157defa2d9706f4",
            ),
            (
                *b"ABCDEFGHIJKLMNOP",
                "19fc8eff82037f1fc0d8ea1d32b5e339",
                "d8fd9459b02eaca5c995ca433cf6a3e8",
            ),
        ];
        for (secret, k, iv) in rows {
            let keys = Keys::new(&secret);
            assert_eq!(keys.secret(), &secret);
            assert_eq!(keys.key(), &arr(k));
            assert_eq!(keys.iv(), &arr(iv));
        }
    }

    #[test]
    fn md5_concatenates_parts() {
        assert_eq!(md5(&[b"ab", b"", b"c"]), md5(&[b"abc"]));
        // RFC 1321 test suite.
        assert_eq!(md5(&[b"abc"]), arr("900150983cd24fb0d6963f7d28e17f72"));
        assert_eq!(md5(&[]), arr("d41d8cd98f00b204e9800998ecf8427e"));
    }

    #[test]
    fn debug_hides_secret() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        let s = format!("{keys:?}");
        assert!(
            !s.contains("ABCD") && !s.contains("65") && !s.contains("19fc"),
            "{s}"
        );
    }

    #[test]
    fn padding_lengths() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        for n in 0..=48 {
            let plain = vec![b'x'; n];
            let ct = keys.encrypt(&plain);
            // Aligned input gets one whole extra block (P§2.3).
            assert_eq!(ct.len(), (n / 16 + 1) * 16, "n={n}");
            assert_eq!(keys.decrypt(&ct).unwrap(), plain);
        }
    }

    proptest::proptest! {
        /// The hand-written CBC agrees with the `cbc` crate (a test-only oracle) both ways.
        #[test]
        fn cbc_matches_the_reference(secret in proptest::prelude::any::<[u8; 16]>(),
                                     plain in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            use aes::cipher::{BlockEncryptMut, KeyIvInit};
            let keys = Keys::new(&secret);
            let pad = BLOCK - plain.len() % BLOCK;
            let mut want = plain.clone();
            want.resize(plain.len() + pad, pad as u8);
            let mut enc = cbc::Encryptor::<aes::Aes128>::new(
                GenericArray::from_slice(keys.key()),
                GenericArray::from_slice(keys.iv()),
            );
            for block in want.chunks_exact_mut(BLOCK) {
                enc.encrypt_block_mut(GenericArray::from_mut_slice(block));
            }
            let ct = keys.encrypt(&plain);
            proptest::prop_assert_eq!(&ct, &want);
            proptest::prop_assert_eq!(keys.decrypt(&ct).unwrap(), plain);
        }
    }

    #[test]
    fn decrypt_refuses_bad_input() {
        let keys = Keys::new(&[0; 16]);
        assert_eq!(keys.decrypt(&[]), Err(Error::BadPayloadLength(0)));
        assert_eq!(keys.decrypt(&[0; 17]), Err(Error::BadPayloadLength(17)));
        // The first block of a two-block ciphertext decrypts to data, whose last byte is no pad.
        let ct = keys.encrypt(b"0123456789abcde\0");
        assert_eq!(keys.decrypt(&ct[..16]), Err(Error::BadPadding));
        // Plaintext ending in 0x11 (> 16) as if it were padding.
        let ct = keys.encrypt(&[0x11; 16]);
        assert_eq!(keys.decrypt(&ct[..16]), Err(Error::BadPadding));
        // A pad byte of 2 preceded by a byte that is not 2.
        let ct = keys.encrypt(b"0123456789abcd\x01\x02");
        assert_eq!(keys.decrypt(&ct[..16]), Err(Error::BadPadding));
        // ... and the valid case with the same shape.
        let ct = keys.encrypt(b"0123456789abcd\x02\x02");
        assert_eq!(keys.decrypt(&ct[..16]).unwrap(), b"0123456789abcd");
    }
}
