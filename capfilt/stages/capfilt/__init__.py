"""The CapFilt stage: caption every web image, score every text, write cleaned shards."""
