//! One ACME issuance with `instant-acme`: the account (cached, created with External Account
//! Binding when configured), then an order, its challenges, the CSR and the chain.
//!
//! Challenge choice follows autocert (derper's client): TLS-ALPN-01 first, HTTP-01 when the
//! `-http-port` listener runs; when validation with one type fails, a fresh order is tried with
//! the next (an authorization that failed once stays invalid). IP identifiers (RFC 8738) use
//! HTTP-01 only, as derper does.

use std::path::Path;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};

use super::cache::{self, CertBundle};
use super::challenge::Challenges;
use super::client::CaClient;
use super::{Eab, Identity, SHORTLIVED_PROFILE};

/// The RFC 8555 problem type a CA answers when it needs External Account Binding.
const EXTERNAL_ACCOUNT_REQUIRED: &str = "urn:ietf:params:acme:error:externalAccountRequired";

/// Loads the account for `directory_url` from `certdir`, or registers one (agreeing to the
/// terms, as derper's `autocert.AcceptTOS`) and caches it.
pub(super) async fn account(
    http: &CaClient,
    certdir: &Path,
    directory_url: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<Account, String> {
    let path = cache::account_path(certdir, directory_url);
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<AccountCredentials>(&bytes) {
            Ok(creds) => {
                return Account::builder_with_http(Box::new(http.clone()))
                    .from_credentials(creds)
                    .await
                    .map_err(|e| format!("restoring the account of {}: {e}", path.display()));
            }
            Err(e) => tracing::warn!("ACME: ignoring {}: {e}", path.display()),
        }
    }
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
    let eak = eab.map(|e| ExternalAccountKey::new(e.kid.clone(), &e.key));
    let (account, creds) = Account::builder_with_http(Box::new(http.clone()))
        .create(&new, directory_url.to_owned(), eak.as_ref())
        .await
        .map_err(|e| match &e {
            instant_acme::Error::Api(p) if p.r#type.as_deref() == Some(EXTERNAL_ACCOUNT_REQUIRED) => format!(
                "creating the account at {directory_url}: the CA requires External Account Binding; set \
                 -acme-eab-kid and -acme-eab-key ({e})"
            ),
            _ => format!("creating the account at {directory_url}: {e}"),
        })?;
    let json = serde_json::to_vec(&creds).map_err(|e| format!("encoding the account: {e}"))?;
    cache::write_atomic(&path, &json, 0o600).map_err(|e| format!("writing {}: {e}", path.display()))?;
    tracing::info!("ACME: registered account {} at {directory_url}", account.id());
    Ok(account)
}

/// A new certificate and how it was validated.
pub(super) struct Issued {
    pub bundle: CertBundle,
    pub key_pem: String,
    pub chain_pem: String,
    pub challenge: &'static str,
    pub profile: Option<String>,
}

/// Orders a certificate for `identity`, trying the challenge types in `kinds` in turn.
pub(super) async fn issue(
    account: &Account,
    identity: &Identity,
    kinds: &[ChallengeType],
    challenges: &Challenges,
) -> Result<Issued, String> {
    let profile = profile_for(account, identity);
    let mut failures = Vec::new();
    for kind in kinds {
        match order_once(account, identity, kind, profile.as_deref(), challenges).await {
            Ok(mut issued) => {
                issued.profile = profile;
                return Ok(issued);
            }
            Err(OrderError::Validation(e)) => {
                tracing::warn!("ACME: {identity}: {} validation failed: {e}", kind_name(kind));
                failures.push(format!("{}: {e}", kind_name(kind)));
            }
            Err(OrderError::Other(e)) => return Err(e),
        }
    }
    Err(format!("no challenge type succeeded ({})", failures.join("; ")))
}

/// derper orders IP certificates with Let's Encrypt's "shortlived" profile (required there for
/// IP addresses). It is requested when the CA advertises it; a CA without profiles (e.g. pebble
/// before 2.7) gets a plain order. DNS certificates use the CA's default profile, as autocert.
fn profile_for(account: &Account, identity: &Identity) -> Option<String> {
    if !matches!(identity, Identity::Ip(_)) {
        return None;
    }
    let offered = account.profiles().any(|p| p.name == SHORTLIVED_PROFILE);
    if offered {
        Some(SHORTLIVED_PROFILE.to_owned())
    } else {
        tracing::info!(
            "ACME: the CA advertises no {SHORTLIVED_PROFILE:?} profile; ordering the {identity} certificate \
             with its default profile"
        );
        None
    }
}

enum OrderError {
    /// The CA could not validate this challenge type; another may work.
    Validation(String),
    /// Anything else (network, account, finalisation): trying another type will not help.
    Other(String),
}

fn kind_name(kind: &ChallengeType) -> &'static str {
    match kind {
        ChallengeType::Http01 => "http-01",
        ChallengeType::TlsAlpn01 => "tls-alpn-01",
        ChallengeType::Dns01 => "dns-01",
        _ => "other",
    }
}

/// What was set up for one authorization, removed when the order is settled.
enum Opened {
    Http01(String),
    TlsAlpn01(String),
}

async fn order_once(
    account: &Account,
    identity: &Identity,
    kind: &ChallengeType,
    profile: Option<&str>,
    challenges: &Challenges,
) -> Result<Issued, OrderError> {
    let other = |what: &str, e: &dyn std::fmt::Display| OrderError::Other(format!("{identity}: {what}: {e}"));
    let identifiers = [match identity {
        Identity::Dns(name) => Identifier::Dns(name.clone()),
        Identity::Ip(ip) => Identifier::Ip(*ip),
    }];
    let mut new = NewOrder::new(&identifiers);
    if let Some(p) = profile {
        new = new.profile(p);
    }
    let mut order = account.new_order(&new).await.map_err(|e| other("new order", &e))?;
    let mut opened = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| other("authorization", &e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(other("authorization", &format!("{status:?}"))),
            }
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                OrderError::Validation(format!("the CA offers no {} challenge", kind_name(kind)))
            })?;
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeType::Http01 => {
                    challenges.set_http01(&challenge.token, key_auth.as_str());
                    opened.push(Opened::Http01(challenge.token.clone()));
                }
                _ => {
                    let name = challenge.identifier().to_string();
                    challenges
                        .set_tls_alpn01(&name, key_auth.digest().as_ref())
                        .map_err(OrderError::Other)?;
                    opened.push(Opened::TlsAlpn01(name));
                }
            }
            challenge.set_ready().await.map_err(|e| other("challenge", &e))?;
        }
        let retry = RetryPolicy::new().timeout(std::time::Duration::from_secs(90));
        match order.poll_ready(&retry).await {
            Ok(OrderStatus::Ready) => Ok(()),
            Ok(status) => {
                Err(OrderError::Validation(format!("order {status:?}{}", challenge_errors(&mut order).await)))
            }
            Err(instant_acme::Error::Api(p)) => Err(OrderError::Validation(p.to_string())),
            Err(e) => Err(other("waiting for validation", &e)),
        }
    }
    .await;
    for o in opened {
        match o {
            Opened::Http01(token) => challenges.remove_http01(&token),
            Opened::TlsAlpn01(name) => challenges.remove_tls_alpn01(&name),
        }
    }
    result?;

    let key = KeyPair::generate().map_err(|e| other("certificate key", &e))?;
    let mut params = CertificateParams::new(vec![identity.to_string()]).map_err(|e| other("CSR", &e))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| other("CSR", &e))?;
    order.finalize_csr(csr.der()).await.map_err(|e| other("finalizing", &e))?;
    let chain_pem =
        order.poll_certificate(&RetryPolicy::new()).await.map_err(|e| other("downloading", &e))?;
    let key_pem = key.serialize_pem();
    let bundle = CertBundle::from_pem(identity, key_pem.as_bytes(), chain_pem.as_bytes())
        .map_err(|e| other("the issued certificate", &e))?;
    Ok(Issued { bundle, key_pem, chain_pem, challenge: kind_name(kind), profile: None })
}

/// The CA's reasons from the order's challenges, for the log.
async fn challenge_errors(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            reasons.extend(state.challenges.iter().filter_map(|c| c.error.as_ref().map(|p| p.to_string())));
        }
    }
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join("; "))
    }
}
