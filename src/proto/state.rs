//! The daemon states of LOCAL_API.md §7, their numbers (seen in log lines `STATE: (6)`), the
//! `local.status` strings, and the vendor log names firmware engineers grep for.

/// LOCAL_API.md §7. The discriminant is the state number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    DeviceInit = 0,
    DidkeyReq1 = 1,
    DidkeyReq2 = 2,
    DidkeyDone = 3,
    TokenDone = 4,
    WifiApMode = 5,
    WifiStaMode = 6,
    CloudTrying = 7,
    CloudConnected = 8,
    CloudRetry = 9,
}

impl State {
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The string of `local.query_status` (D17: state 5 is `wifi_ap_mode`).
    pub fn status(self) -> &'static str {
        match self {
            State::DeviceInit => "device_init",
            State::DidkeyReq1 => "didkey_req1",
            State::DidkeyReq2 => "didkey_req2",
            State::DidkeyDone => "didkey_done",
            State::TokenDone => "token_done",
            State::WifiApMode => "wifi_ap_mode",
            State::WifiStaMode => "sta_mode",
            State::CloudTrying => "cloud_trying",
            State::CloudConnected => "cloud_connected",
            State::CloudRetry => "cloud_retry",
        }
    }

    /// The vendor's log name, e.g. `STATE_CLOUD_CONNECTED` (vendor §十七 FAQ 4).
    pub fn log_name(self) -> &'static str {
        match self {
            State::DeviceInit => "STATE_DEVICE_INIT",
            State::DidkeyReq1 => "STATE_DIDKEY_REQ1",
            State::DidkeyReq2 => "STATE_DIDKEY_REQ2",
            State::DidkeyDone => "STATE_DIDKEY_DONE",
            State::TokenDone => "STATE_TOKEN_DONE",
            State::WifiApMode => "STATE_WIFI_AP_MODE",
            State::WifiStaMode => "STATE_WIFI_STA_MODE",
            State::CloudTrying => "STATE_CLOUD_TRYING",
            State::CloudConnected => "STATE_CLOUD_CONNECTED",
            State::CloudRetry => "STATE_CLOUD_CONNECT_RETRY",
        }
    }

    /// The vendor-style transition line: `STATE: (6) -> STATE_CLOUD_TRYING`.
    pub fn transition_line(from: State, to: State) -> String {
        format!("STATE: ({}) -> {}", from.number(), to.log_name())
    }

    /// The token is known from `token_done` on, including the did/key states after it (P§4.2).
    pub fn token_known(self) -> bool {
        !matches!(
            self,
            State::DeviceInit | State::DidkeyReq1 | State::DidkeyDone
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names() {
        assert_eq!(State::WifiStaMode.number(), 6);
        assert_eq!(State::WifiApMode.status(), "wifi_ap_mode");
        assert_eq!(State::WifiStaMode.status(), "sta_mode");
        assert_eq!(
            State::transition_line(State::WifiStaMode, State::CloudTrying),
            "STATE: (6) -> STATE_CLOUD_TRYING"
        );
        assert!(State::TokenDone.token_known());
        assert!(State::DidkeyReq2.token_known());
        assert!(!State::DeviceInit.token_known());
    }
}
