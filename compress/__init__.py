"""compress: KV codecs (page layouts, encode, decode-side attention, wire form)."""
