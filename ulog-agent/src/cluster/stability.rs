//! When a node may answer its kernel: a frame is *stable* once a crash of this node cannot lose
//! it (issue 11, guarantee 2).
//!
//! CPG delivers in AGREED order only: a node's own delivery of its frame proves nothing about
//! the survivors (the frame may have reached nobody else when the node crashed). So each
//! frame is acknowledged by one other live member, its *acker*: the live member with the
//! lowest node id other than the sender. The acker multicasts `Ack { node, seq }` once it has
//! applied the sender's frames up to `seq`; the sender's frames up to `seq` are then stable.
//! One ordered message per acknowledged batch, from one member, whatever the group's size.
//!
//! Membership changes: virtual synchrony delivers a frame to every member that survives the
//! change before the change itself, so when the acker dies, the next acker has applied every
//! frame the old one had, and acknowledges the highest of each sender at once
//! ([`Stability::acks_due_after_change`]). A sender alone in the group has no second holder:
//! its frames are stable on their own delivery for `clustered-core` (if this node dies, so does
//! the only kernel that wrote, and a core log starts over), and for `clustered-disk` only once
//! the log device holds them (the transport's rule, not this tracker's).

use std::collections::{BTreeMap, BTreeSet};

use super::state::NodeId;

/// The acknowledgement bookkeeping of one member of one log.
#[derive(Debug)]
pub struct Stability {
    me: NodeId,
    members: BTreeSet<NodeId>,
    /// Highest own sequence delivered back to this node.
    delivered: u64,
    /// Highest own sequence acknowledged by a live other member.
    acked: u64,
    /// Highest sequence applied from each sender (to acknowledge after a change).
    applied: BTreeMap<NodeId, u64>,
    /// The group has other members that do not hold the state yet (joiners): this member is
    /// not alone, even if it is the only holder, and its frames wait for a joiner to hold
    /// them (it acknowledges once it installed the state and replayed them).
    others_in_group: bool,
}

impl Stability {
    /// A member that has just joined a group of `members` (itself included).
    pub fn new(me: NodeId, members: impl IntoIterator<Item = NodeId>) -> Self {
        let mut members: BTreeSet<NodeId> = members.into_iter().collect();
        members.insert(me);
        Self { me, members, delivered: 0, acked: 0, applied: BTreeMap::new(), others_in_group: false }
    }

    /// A member that got the state by transfer: `applied` is the highest sequence of each
    /// sender that the transferred state contains (the donor's [`Stability::applied`]), so it
    /// can acknowledge those frames if it becomes their sender's acker.
    pub fn with_applied(me: NodeId, members: impl IntoIterator<Item = NodeId>, applied: BTreeMap<NodeId, u64>) -> Self {
        let mut s = Self::new(me, members);
        s.applied = applied;
        s
    }

    /// Highest sequence applied from each sender.
    pub fn applied(&self) -> &BTreeMap<NodeId, u64> {
        &self.applied
    }

    /// The acknowledgements this member owes as acker of its senders, for everything it
    /// applied (after it got the state: the frames it replayed may never have been acked).
    pub fn acks_owed(&self) -> Vec<(NodeId, u64)> {
        self.applied
            .iter()
            .filter(|&(&s, _)| s != self.me && self.acker_of(s) == Some(self.me))
            .map(|(&s, &seq)| (s, seq))
            .collect()
    }

    /// The member that acknowledges `sender`'s frames: the lowest live member other than it.
    pub fn acker_of(&self, sender: NodeId) -> Option<NodeId> {
        self.members.iter().copied().find(|&n| n != sender)
    }

    /// A frame of `sender` with sequence `seq` was delivered and applied here. Returns the
    /// acknowledgement this node must multicast, if it is the sender's acker.
    pub fn delivered(&mut self, sender: NodeId, seq: u64) -> Option<(NodeId, u64)> {
        let a = self.applied.entry(sender).or_insert(0);
        *a = (*a).max(seq);
        if sender == self.me {
            self.delivered = self.delivered.max(seq);
            return None;
        }
        (self.acker_of(sender) == Some(self.me)).then_some((sender, seq))
    }

    /// An acknowledgement was delivered.
    pub fn ack(&mut self, from: NodeId, node: NodeId, seq: u64) {
        if node == self.me && from != self.me && self.members.contains(&from) {
            self.acked = self.acked.max(seq);
        }
    }

    /// Whether own frame `seq` is held where a crash of this node cannot lose it: acknowledged
    /// by a live other member, or (alone in the group) delivered.
    pub fn is_stable(&self, seq: u64) -> bool {
        self.acked >= seq || (self.members.len() == 1 && !self.others_in_group && self.delivered >= seq)
    }

    /// Whether the group has members other than this one (holders or not).
    pub fn set_others_in_group(&mut self, others: bool) {
        self.others_in_group = others;
    }

    /// A membership change was delivered. Returns the acknowledgements this node now owes:
    /// for every sender whose acker it became, the highest frame applied from it.
    pub fn acks_due_after_change(&mut self, members: impl IntoIterator<Item = NodeId>) -> Vec<(NodeId, u64)> {
        let before: BTreeMap<NodeId, Option<NodeId>> = self.applied.keys().map(|&s| (s, self.acker_of(s))).collect();
        self.members = members.into_iter().collect();
        self.members.insert(self.me);
        self.applied.retain(|s, _| self.members.contains(s));
        self.applied
            .iter()
            .filter(|&(&s, _)| s != self.me)
            .filter(|&(&s, _)| self.acker_of(s) == Some(self.me) && before.get(&s) != Some(&Some(self.me)))
            .map(|(&s, &seq)| (s, seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_delivery_is_not_enough_with_others_in_the_group() {
        let mut s = Stability::new(2, [1, 2, 3]);
        assert_eq!(s.delivered(2, 1), None);
        assert!(!s.is_stable(1), "AGREED delivery to the sender proves nothing about the others");
        s.ack(9, 2, 1);
        assert!(!s.is_stable(1), "an ack from outside the group counts for nothing");
        s.ack(3, 2, 1);
        assert!(s.is_stable(1), "a live other member applied it");
    }

    #[test]
    fn the_lowest_other_member_acknowledges() {
        let mut one = Stability::new(1, [1, 2, 3]);
        let mut three = Stability::new(3, [1, 2, 3]);
        assert_eq!(one.delivered(2, 7), Some((2, 7)), "1 acks 2's frames");
        assert_eq!(three.delivered(2, 7), None);
        assert_eq!(three.delivered(1, 4), None, "2 acks 1's frames");
        let mut two = Stability::new(2, [1, 2, 3]);
        assert_eq!(two.delivered(1, 4), Some((1, 4)));
        two.delivered(2, 7);
        two.ack(1, 2, 7);
        assert!(two.is_stable(7) && two.is_stable(6) && !two.is_stable(8));
    }

    #[test]
    fn a_new_acker_acknowledges_what_it_applied_when_the_old_one_dies() {
        let mut three = Stability::new(3, [1, 2, 3]);
        three.delivered(2, 5);
        three.delivered(1, 9);
        // Node 1 (2's acker) dies before its ack reached anyone: 3 becomes 2's acker.
        assert_eq!(three.acks_due_after_change([2, 3]), vec![(2, 5)]);
        // An ack from a member that has left counts for nothing.
        let mut two = Stability::new(2, [2, 3]);
        two.delivered(2, 5);
        two.ack(1, 2, 5);
        assert!(!two.is_stable(5));
        two.ack(3, 2, 5);
        assert!(two.is_stable(5));
    }

    #[test]
    fn alone_a_frame_is_stable_on_delivery() {
        let mut s = Stability::new(4, [4]);
        assert!(!s.is_stable(1));
        s.delivered(4, 1);
        assert!(s.is_stable(1));
        s.set_others_in_group(true);
        s.delivered(4, 2);
        assert!(!s.is_stable(2), "a joiner without the state yet: it must hold the frame first");
        s.set_others_in_group(false);
        s.acks_due_after_change([4, 5]);
        s.delivered(4, 2);
        assert!(!s.is_stable(2), "a second member joined: it must hold the frame");
    }
}
