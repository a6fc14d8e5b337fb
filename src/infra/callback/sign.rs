//! Standard Webhooks signing of outgoing callbacks, so any official Standard Webhooks library
//! verifies them.
//!
//! Reads nothing, writes nothing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Standard Webhooks headers for a body: `webhook-id`, `webhook-timestamp` (Unix seconds) and
/// `webhook-signature`: for each secret, `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`,
/// space-separated (the specification's way to sign with a new and an old secret while a
/// rotation overlaps). A secret in the `whsec_<base64>` form is used as the key it encodes,
/// any other secret as its bytes.
pub fn sign(secrets: &[&str], message_id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
    let signatures: Vec<String> =
        secrets.iter().map(|secret| format!("v1,{}", signature(secret, message_id, timestamp, body))).collect();
    [
        ("webhook-id", message_id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
    ]
}

fn signature(secret: &str, message_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = secret.strip_prefix("whsec_").and_then(|encoded| BASE64.decode(encoded).ok());
    let key = key.as_deref().unwrap_or(secret.as_bytes());
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            BASE64.encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is never reached.
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let headers = sign(
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(headers[2].1, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(headers[1].1, "1614265330");
    }

    #[test]
    fn a_rotation_signs_with_each_secret() {
        let (new, old) = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "an-older-secret");
        let both = sign(&[new, old], "msg_1", 1614265330, b"{}");
        let signatures: Vec<&str> = both[2].1.split(' ').collect();
        assert_eq!(signatures.len(), 2);
        assert_eq!(signatures[0], sign(&[new], "msg_1", 1614265330, b"{}")[2].1);
        assert_eq!(signatures[1], sign(&[old], "msg_1", 1614265330, b"{}")[2].1);
    }
}
