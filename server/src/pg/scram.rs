//! The server side of a SCRAM-SHA-256 exchange (RFC 5802, RFC 7677), checked against a stored
//! [`Verifier`]: the client proves it knows the password; the server never sees it, and what
//! it stores cannot be replayed as a login.
//!
//! pgwire's own SCRAM handler wants the salted password itself (which is as good as the
//! password to whoever reads it), so Weir checks proofs the way Postgres does: `ClientKey =
//! ClientProof XOR HMAC(StoredKey, AuthMessage)`, then `H(ClientKey) == StoredKey`.
//!
//! Channel binding (SCRAM-SHA-256-PLUS) is not offered; a client that supports it says so
//! with the `y` flag, which is accepted because the server offered none.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::users::{Verifier, fill_random, hmac_sha256, sha256};

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ScramError {
    /// The client's message does not follow the protocol (08P01).
    Malformed(String),
    /// The proof is wrong, or the user has no password (28P01).
    WrongPassword,
}

/// An exchange after the server's first message, waiting for the client's final one.
pub struct Exchange {
    verifier: Verifier,
    /// No such user, or no password: the exchange runs to the end (so that a client cannot
    /// tell the cases apart) and then fails.
    mock: bool,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Handles the client's first message; returns the server's first message. `verifier` is
/// `None` for an unknown user or one without a password: then a salt derived from `secret`
/// and the name answers, the same on every attempt, as Postgres' mock authentication does.
pub fn client_first(
    message: &[u8],
    verifier: Option<Verifier>,
    user: &str,
    secret: &[u8],
) -> Result<(String, Exchange), ScramError> {
    let text = std::str::from_utf8(message)
        .map_err(|_| ScramError::Malformed("client-first-message is not UTF-8".into()))?;
    let (flag, rest) = text
        .split_once(',')
        .ok_or_else(|| malformed("client-first-message has no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => {
            return Err(malformed(
                "channel binding is not supported by this server (use channel_binding=prefer or disable)",
            ));
        }
        _ => return Err(malformed("unknown channel-binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or_else(|| malformed("client-first-message has no GS2 header"))?;
    if !authzid.is_empty() {
        return Err(malformed("an authorization identity is not supported"));
    }
    let mut client_nonce = None;
    for (i, attribute) in bare.split(',').enumerate() {
        match (i, attribute.split_once('=')) {
            (0, Some(("m", _))) => return Err(malformed("mandatory extensions are not supported")),
            // The user name is the startup message's (libpq sends it empty here).
            (0, Some(("n", _))) => {}
            (1, Some(("r", nonce))) if valid_nonce(nonce) => client_nonce = Some(nonce),
            (0 | 1, _) => return Err(malformed("client-first-message needs n= and r=")),
            _ => {}
        }
    }
    let client_nonce =
        client_nonce.ok_or_else(|| malformed("client-first-message has no nonce"))?;
    let mut server_nonce = [0u8; 18];
    fill_random(&mut server_nonce).map_err(|e| malformed(&e.to_string()))?;
    let nonce = format!("{client_nonce}{}", BASE64.encode(server_nonce));
    let (verifier, mock) = match verifier {
        Some(v) => (v, false),
        None => {
            let salt = hmac_sha256(secret, user.as_bytes())[..16].to_vec();
            let mut keys = [0u8; 32];
            fill_random(&mut keys).map_err(|e| malformed(&e.to_string()))?;
            let verifier = Verifier {
                iterations: crate::users::SCRAM_ITERATIONS,
                salt,
                stored_key: keys,
                server_key: keys,
            };
            (verifier, true)
        }
    };
    let server_first = format!(
        "r={nonce},s={},i={}",
        BASE64.encode(&verifier.salt),
        verifier.iterations
    );
    Ok((
        server_first.clone(),
        Exchange {
            verifier,
            mock,
            gs2_header: text[..flag.len() + 1 + authzid.len() + 1].to_string(),
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
        },
    ))
}

impl Exchange {
    /// Checks the client's final message; returns the server's final message (`v=...`),
    /// which proves to the client that the server holds the verifier.
    pub fn client_final(&self, message: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| ScramError::Malformed("client-final-message is not UTF-8".into()))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| malformed("client-final-message has no proof"))?;
        let mut attributes = without_proof.split(',');
        let binding = attributes
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| malformed("client-final-message has no channel binding"))?;
        if BASE64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(malformed("channel binding does not match the GS2 header"));
        }
        let nonce = attributes
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| malformed("client-final-message has no nonce"))?;
        if nonce != self.nonce {
            return Err(malformed("the nonce does not match"));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        if !constant_time_eq(&sha256(&client_key), &self.verifier.stored_key) || self.mock {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

fn malformed(what: &str) -> ScramError {
    ScramError::Malformed(what.to_string())
}

/// RFC 5802: printable ASCII except ','.
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_verifier() -> Verifier {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("ok");
        Verifier::with_salt("pencil", &salt, 4096).expect("ok")
    }

    /// RFC 7677's exchange, with the server nonce it used.
    fn rfc_exchange(verifier: Option<Verifier>) -> Exchange {
        let (_, mut exchange) =
            client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", verifier, "user", b"k").expect("ok");
        exchange.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        exchange.server_first = format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", exchange.nonce);
        exchange
    }

    const RFC_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
        p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    #[test]
    fn rfc_7677_exchange_succeeds() {
        let exchange = rfc_exchange(Some(rfc_verifier()));
        assert_eq!(
            exchange.client_final(RFC_FINAL).expect("ok"),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_alike() {
        let other = Verifier::with_salt("pencil2", &rfc_verifier().salt, 4096).expect("ok");
        let exchange = rfc_exchange(Some(other));
        assert_eq!(
            exchange.client_final(RFC_FINAL),
            Err(ScramError::WrongPassword)
        );
        let exchange = rfc_exchange(None);
        assert_eq!(
            exchange.client_final(RFC_FINAL),
            Err(ScramError::WrongPassword)
        );
        // The mock salt is stable per name, so probing twice reveals nothing.
        let first = |user: &str| {
            client_first(b"n,,n=,r=abc", None, user, b"k")
                .expect("ok")
                .0
        };
        let salt = |m: String| m.split(",s=").nth(1).expect("ok").to_string();
        assert_eq!(salt(first("ghost")), salt(first("ghost")));
        assert_ne!(salt(first("ghost")), salt(first("other")));
    }

    #[test]
    fn malformed_messages_are_refused_not_panics() {
        for bad in [
            &b""[..],
            b"n",
            b"n,",
            b"x,,n=,r=a",
            b"p=tls-server-end-point,,n=,r=a",
            b"n,a=admin,n=,r=a",
            b"n,,m=ext,n=,r=a",
            b"n,,n=,r=",
            b"n,,n=,x=a",
            b"n,,r=a",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(
                    client_first(bad, Some(rfc_verifier()), "u", b"k"),
                    Err(ScramError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let exchange = rfc_exchange(Some(rfc_verifier()));
        for bad in [
            &b""[..],
            b"c=biws",
            b"c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AAAA",
            b"c=biws,r=other,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=short",
            b"r=x,c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ] {
            assert!(
                matches!(exchange.client_final(bad), Err(ScramError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_client_that_could_bind_but_was_not_offered_it_logs_in() {
        let (_, exchange) =
            client_first(b"y,,n=,r=abc", Some(rfc_verifier()), "u", b"k").expect("ok");
        // c= is base64("y,,"); the proof is wrong, but the binding check passes.
        let message = format!("c=eSws,r={},p={}", exchange.nonce, BASE64.encode([0u8; 32]));
        assert_eq!(
            exchange.client_final(message.as_bytes()),
            Err(ScramError::WrongPassword)
        );
    }
}
