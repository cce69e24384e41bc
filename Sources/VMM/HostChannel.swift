import Billboard
import Migration
import SecureChannel

/// This host's end of a migration channel, from its Billboard store: the TLS identity made from
/// the host key, and the peers an administrator enrolled (and this host itself) as the only
/// keys it accepts at the other end.
enum HostChannel {
    static func identity(_ store: BillboardStore) throws -> TLSIdentity {
        let host = try store.tlsIdentity()
        return TLSIdentity(hostName: host.hostName, certificateDER: host.certificateDER, privateKey: host.privateKey)
    }

    static func authorizer(_ store: BillboardStore) -> PeerAuthorizer {
        { key in store.peerHosts.authorizedHost(signingKey: key) }
    }

    /// Mutually authenticated TLS from this host to `destination`, which must be the enrolled `peer`.
    static func connect(_ store: BillboardStore, to destination: String, peer: String) throws -> any MigrationTransport {
        try TLSTransport.connect(to: destination, identity: try identity(store), authorize: authorizer(store), expectedPeer: peer)
    }
}

extension GuestDoors {
    /// Where incoming migrations arrive: mutually authenticated TLS 1.3 with this store's host
    /// identity, admitting only enrolled peers; or plain TCP when the operator consented.
    public static func listen(_ address: String, store: BillboardStore, plaintext: Bool) throws -> any MigrationListener {
        if plaintext { return try TCPListener(listen: address) }
        return try TLSListener(listen: address, identity: try HostChannel.identity(store), authorize: HostChannel.authorizer(store))
    }
}

extension AdmittedGuest {
    /// Opens the migration's transport: mutually authenticated TLS to the enrolled host the
    /// settings name, or plain TCP when the settings chose it (the destination must too).
    public func connect(_ settings: MigrationSettings) throws -> any MigrationTransport {
        switch settings.transport {
        case .plaintext:
            return try TCPTransport.connect(to: settings.destination)
        case .tls:
            guard let peer = settings.peer else {
                throw MigrationError.refused("name the enrolled host expected at \(settings.destination) (the peer), or choose the plaintext transport")
            }
            return try HostChannel.connect(session.store, to: settings.destination, peer: peer)
        }
    }
}
