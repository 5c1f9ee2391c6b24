//! Integration tests of the gateway: real HTTP on loopback between the client, the
//! gateway (`helexa::api::app`) and in-process stand-in nodes.

mod config_files;
mod harness;
mod hostile_policies;
mod openai;
mod plugins;
mod routing;
mod scaffold;
mod stand_in;
mod surfaces;
mod translated;
