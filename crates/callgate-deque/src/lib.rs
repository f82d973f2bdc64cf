//! [`InlineDeque`]: a FIFO queue whose front item lives inside the queue itself, and only the
//! items behind it in a [`VecDeque`].
//!
//! # Why
//! A call's audio frame passes through five queues on its way back out (the protocol
//! session's outputs, the call core's effects, the agent's event queue, the agent's command
//! queue, the playout). Each almost always holds zero or one item. A `VecDeque` keeps even that
//! one item in a heap buffer of its own, and its ring moves on with every push and pop, so
//! with hundreds of calls on a core every frame finds that line cold: one cache miss per queue
//! per frame, on top of the line the queue's owner already touched. Here the front item sits
//! beside the queue's other fields: a queue that holds at most one item touches no other memory.
//!
//! # Invariant
//! `head` is `None` only when `rest` is empty: the front item, if any, is always `head`.

use std::collections::VecDeque;

/// A FIFO queue with its front item inline (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineDeque<T> {
    head: Option<T>,
    rest: VecDeque<T>,
}

impl<T> Default for InlineDeque<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> InlineDeque<T> {
    /// An empty queue; it allocates only once it holds two items.
    pub const fn new() -> Self {
        Self {
            head: None,
            rest: VecDeque::new(),
        }
    }

    /// Adds `item` at the back.
    pub fn push_back(&mut self, item: T) {
        if self.head.is_none() {
            self.head = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    /// Adds `item` at the front.
    pub fn push_front(&mut self, item: T) {
        if let Some(old) = self.head.replace(item) {
            self.rest.push_front(old);
        }
    }

    /// Takes the front item.
    pub fn pop_front(&mut self) -> Option<T> {
        let item = self.head.take()?;
        self.head = self.rest.pop_front();
        Some(item)
    }

    /// Takes the back item.
    pub fn pop_back(&mut self) -> Option<T> {
        match self.rest.pop_back() {
            Some(item) => Some(item),
            None => self.head.take(),
        }
    }

    /// The front item.
    pub fn front(&self) -> Option<&T> {
        self.head.as_ref()
    }

    /// The front item, to change in place.
    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.head.as_mut()
    }

    /// The back item.
    pub fn back(&self) -> Option<&T> {
        self.rest.back().or(self.head.as_ref())
    }

    /// The back item, to change in place.
    pub fn back_mut(&mut self) -> Option<&mut T> {
        match self.rest.back_mut() {
            Some(item) => Some(item),
            None => self.head.as_mut(),
        }
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Removes every item.
    pub fn clear(&mut self) {
        self.head = None;
        self.rest.clear();
    }

    /// The items, front to back.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            head: self.head.as_ref(),
            rest: self.rest.iter(),
        }
    }

    /// Removes and returns the item at `index` (0 is the front), if there is one.
    pub fn remove(&mut self, index: usize) -> Option<T> {
        if index == 0 {
            self.pop_front()
        } else {
            self.rest.remove(index - 1)
        }
    }

    /// Keeps only the items for which `keep` is true, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.rest.retain(&mut keep);
        if self.head.as_ref().is_some_and(|h| !keep(h)) {
            self.head = self.rest.pop_front();
        }
    }

    /// Takes every item, front to back, leaving the queue empty.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.head.take().into_iter().chain(self.rest.drain(..))
    }
}

/// [`InlineDeque::iter`]'s iterator.
#[derive(Debug)]
pub struct Iter<'a, T> {
    head: Option<&'a T>,
    rest: std::collections::vec_deque::Iter<'a, T>,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        self.head.take().or_else(|| self.rest.next())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.head.is_some()) + self.rest.len();
        (n, Some(n))
    }
}

impl<T> DoubleEndedIterator for Iter<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.rest.next_back().or_else(|| self.head.take())
    }
}

impl<T> ExactSizeIterator for Iter<'_, T> {}

impl<T> Extend<T> for InlineDeque<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for item in items {
            self.push_back(item);
        }
    }
}

impl<T> FromIterator<T> for InlineDeque<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut queue = Self::new();
        queue.extend(items);
        queue
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn one_item_needs_no_heap_buffer() {
        let mut q = InlineDeque::new();
        for i in 0..100 {
            q.push_back(i);
            assert_eq!(q.pop_front(), Some(i));
        }
        assert_eq!(
            q.rest.capacity(),
            0,
            "never more than one item: nothing allocated"
        );
        q.push_back(1);
        q.push_back(2);
        assert!(q.rest.capacity() > 0);
    }

    /// Every operation, against `VecDeque` as the model.
    #[derive(Debug, Clone)]
    enum Op {
        PushBack(u8),
        PushFront(u8),
        PopFront,
        PopBack,
        Remove(usize),
        Retain(u8),
        FrontMut(u8),
        BackMut(u8),
        Clear,
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(Op::PushBack),
            1 => any::<u8>().prop_map(Op::PushFront),
            3 => Just(Op::PopFront),
            1 => Just(Op::PopBack),
            1 => (0usize..6).prop_map(Op::Remove),
            1 => (1u8..5).prop_map(Op::Retain),
            1 => any::<u8>().prop_map(Op::FrontMut),
            1 => any::<u8>().prop_map(Op::BackMut),
            1 => Just(Op::Clear),
            1 => Just(Op::Drain),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_vecdeque(ops in proptest::collection::vec(op(), 0..200)) {
            let mut q = InlineDeque::new();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Op::PushBack(x) => { q.push_back(x); model.push_back(x); }
                    Op::PushFront(x) => { q.push_front(x); model.push_front(x); }
                    Op::PopFront => prop_assert_eq!(q.pop_front(), model.pop_front()),
                    Op::PopBack => prop_assert_eq!(q.pop_back(), model.pop_back()),
                    Op::Remove(i) => prop_assert_eq!(q.remove(i), model.remove(i)),
                    Op::Retain(m) => { q.retain(|x| x % m == 0); model.retain(|x| x % m == 0); }
                    Op::FrontMut(x) => {
                        if let (Some(a), Some(b)) = (q.front_mut(), model.front_mut()) {
                            *a = x;
                            *b = x;
                        }
                    }
                    Op::BackMut(x) => {
                        if let (Some(a), Some(b)) = (q.back_mut(), model.back_mut()) {
                            *a = x;
                            *b = x;
                        }
                    }
                    Op::Clear => { q.clear(); model.clear(); }
                    Op::Drain => {
                        prop_assert_eq!(q.drain().collect::<Vec<_>>(), model.drain(..).collect::<Vec<_>>());
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.is_empty(), model.is_empty());
                prop_assert_eq!(q.front(), model.front());
                prop_assert_eq!(q.back(), model.back());
                prop_assert_eq!(q.iter().collect::<Vec<_>>(), model.iter().collect::<Vec<_>>());
                prop_assert_eq!(q.iter().rev().collect::<Vec<_>>(), model.iter().rev().collect::<Vec<_>>());
                prop_assert!(q.head.is_some() || q.rest.is_empty(), "the invariant holds");
            }
        }
    }
}
