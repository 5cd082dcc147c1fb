"""What the broker and its clients share: the protocol of grant-broker.

The generated messages and services (:mod:`.v1`), the fd channel's framing
(:mod:`.fdchannel`), owned descriptors (:mod:`.fds`), the descriptor-transfer
table (:mod:`.transfers`), the one error type (:mod:`.errors`) and its gRPC
status table (:mod:`.status`), the values of the kernel interfaces that
travel in requests (:mod:`.abi`), shared memory mapped from spans
(:mod:`.memory`), the grant-copy ring's record (:mod:`.copyring`), and
where a broker listens (:mod:`.endpoints`).  It imports nothing of the
daemon or of the SDK.
"""
