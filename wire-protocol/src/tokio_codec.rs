//! tokio-util's `Decoder` and `Encoder` for the codecs (feature `tokio-codec`), so the
//! services frame their sockets with `Framed`. The protocol itself needs no runtime: with
//! the feature off the crate depends on no async code at all, and every codec is usable
//! through its own methods (the simulator and the fuzzers do so).

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::MessageCodec;
use crate::error::{Error, Result};
use crate::frame::{Frame, FrameCodec};
use crate::message::Message;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        FrameCodec::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        FrameCodec::decode_eof(self, src)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        FrameCodec::encode(self, frame, dst)
    }
}

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>> {
        MessageCodec::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>> {
        MessageCodec::decode_eof(self, src)
    }
}

impl Encoder<&Message> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<()> {
        MessageCodec::encode(self, msg, dst)
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<()> {
        MessageCodec::encode(self, &msg, dst)
    }
}
