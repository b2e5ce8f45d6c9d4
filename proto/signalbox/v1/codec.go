package signalboxv1

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/proto"
)

// Frame is a message already marshalled, sent as is by Codec.
type Frame []byte

// Codec is the gRPC "proto" codec plus pass-through of Frame values, so a
// server can send pre-assembled bytes on a stream whose declared type is an
// ordinary message. Install it with grpc.ForceServerCodecV2 or use it as is
// via grpc.ForceServerCodec.
type Codec struct{}

var _ encoding.Codec = Codec{}

// Marshal encodes v.
func (Codec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case Frame:
		return m, nil
	case *Frame:
		return *m, nil
	case proto.Message:
		return proto.Marshal(m)
	default:
		return nil, fmt.Errorf("signalbox codec: cannot marshal %T", v)
	}
}

// Unmarshal decodes data into v.
func (Codec) Unmarshal(data []byte, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("signalbox codec: cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(data, m)
}

// Name is "proto", so clients need no special setup.
func (Codec) Name() string { return "proto" }
