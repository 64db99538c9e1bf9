//! The wire protocol shared by the host and the guest agent.
