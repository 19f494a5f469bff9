package client

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiteq/kiteq/protocol"
	"github.com/kiteq/kiteq/registry"
	"github.com/kiteq/kiteq/registry/binding"
)

// IListener receives what brokers push to the client.
type IListener interface {
	// OnMessage handles a delivered message; true acknowledges it, false
	// (or a panic) asks the broker to deliver it again later.
	OnMessage(msg *protocol.StringMessage) bool
	// OnMessageCheck decides an uncommitted message of this producer group
	// that the broker asks about: call tx.Commit() or tx.Rollback(). An
	// error, a panic or no decision leaves the message undecided, and the
	// broker asks again later.
	OnMessageCheck(tx *protocol.TxResponse) error
}

// IBytesListener is implemented by a listener that wants bytes messages as
// they are. A listener without it gets a bytes message through OnMessage,
// as a StringMessage whose body is string(body).
type IBytesListener interface {
	OnBytesMessage(msg *protocol.BytesMessage) bool
}

// Defaults of the settings.
const (
	DefaultSendTimeout       = 5 * time.Second
	DefaultHeartbeatInterval = 10 * time.Second
	DefaultHeartbeatTimeout  = 30 * time.Second
)

// Reconnect backoff: 100ms doubling to 5s, with jitter.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

const (
	stateNew = iota
	stateStarting
	stateStarted
	stateClosed
)

// KiteQClient is a producer, a consumer, or both, of one group. It keeps
// one connection to every broker that serves one of its topics. All its
// methods are safe for concurrent use; the setters take effect when called
// before Start, except SetSendTimeout and SetLogger, which apply at once.
type KiteQClient struct {
	registryURI string
	groupId     string
	secretKey   string
	listener    IListener

	sendTimeout atomic.Int64 // time.Duration
	logger      atomic.Pointer[func(format string, args ...any)]

	mu          sync.Mutex // guards what follows, up to started
	state       int
	topics      []string
	bindings    []*binding.Binding
	hbInterval  time.Duration
	hbTimeout   time.Duration
	discovery   registry.Discovery
	brokers     map[string]*broker // by address
	bindingsMsg *protocol.BindingsPacket

	// Fixed once Start has set started; read without the lock.
	started   atomic.Bool
	routes    map[string]*route // every topic of SetTopics and of the bindings
	pubTopics map[string]bool   // the topics of SetTopics
	ctx       context.Context   // ends at Destroy
	cancel    context.CancelFunc

	wg sync.WaitGroup // every goroutine the client starts

	readyMu sync.Mutex
	readyCh chan struct{} // closed and replaced when a connection becomes ready

	ignored atomic.Uint64 // packets of commands a client does not expect
}

// NewKiteQClient returns a client of group groupId that finds its brokers
// through registryURI: "static://host:port[,host:port]" lists the brokers;
// "zk://host:port[,…]" (or a bare host list) names a ZooKeeper ensemble.
// listener may be nil for a producer that sends no transactional messages.
func NewKiteQClient(registryURI, groupId, secretKey string, listener IListener) *KiteQClient {
	c := &KiteQClient{
		registryURI: registryURI,
		groupId:     groupId,
		secretKey:   secretKey,
		listener:    listener,
		hbInterval:  DefaultHeartbeatInterval,
		hbTimeout:   DefaultHeartbeatTimeout,
		brokers:     map[string]*broker{},
		readyCh:     make(chan struct{}),
	}
	c.sendTimeout.Store(int64(DefaultSendTimeout))
	c.SetLogger(stderrLogger)
	return c
}

var stdlog = log.New(os.Stderr, "kiteq: ", log.LstdFlags)

func stderrLogger(format string, args ...any) { stdlog.Printf(format, args...) }

// SetTopics sets the topics this client publishes. Call it before Start;
// later calls have no effect.
func (c *KiteQClient) SetTopics(topics []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateNew {
		c.topics = slices.Clone(topics)
	}
}

// SetBindings sets the subscriptions of this client's group; each binding's
// GroupId must be the client's. Call it before Start; later calls have no
// effect.
func (c *KiteQClient) SetBindings(bs []*binding.Binding) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateNew {
		c.bindings = slices.Clone(bs)
	}
}

// SetSendTimeout bounds every send, from the call to the store ack,
// including the wait for a connection (default 5s). It also bounds a
// connection attempt. A value <= 0 restores the default.
func (c *KiteQClient) SetSendTimeout(d time.Duration) {
	if d <= 0 {
		d = DefaultSendTimeout
	}
	c.sendTimeout.Store(int64(d))
}

// SetHeartbeat sets how often a connection sends a heartbeat (default 10s)
// and how long it may go without reading anything before the client closes
// it and reconnects (default 30s). Call it before Start; later calls have
// no effect.
func (c *KiteQClient) SetHeartbeat(interval, timeout time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != stateNew {
		return
	}
	if interval > 0 {
		c.hbInterval = interval
	}
	if timeout > 0 {
		c.hbTimeout = timeout
	}
}

// SetLogger sets where the client reports what it handles by itself: lost
// connections, failed reconnects, undecodable packets. By default it logs to
// standard error with the prefix "kiteq: "; nil silences it. Errors of the
// calls themselves are returned, never logged.
func (c *KiteQClient) SetLogger(logf func(format string, args ...any)) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	c.logger.Store(&logf)
}

func (c *KiteQClient) logf(format string, args ...any) { (*c.logger.Load())(format, args...) }

func (c *KiteQClient) timeout() time.Duration { return time.Duration(c.sendTimeout.Load()) }

// Start connects to the brokers of the client's topics. It returns an error
// for a bad registry URI, a client with neither topics nor bindings, an
// invalid binding, or a broker that refuses the credentials (ErrAuth) or
// the bindings (ErrBindingsRefused). A broker that cannot be reached is not
// an error: the client keeps trying in the background, and sends wait for
// it up to the send timeout. After a failed Start the client is destroyed.
func (c *KiteQClient) Start() error {
	if err := c.start(); err != nil {
		c.Destroy()
		return err
	}
	return nil
}

func (c *KiteQClient) start() error {
	c.mu.Lock()
	switch c.state {
	case stateClosed:
		c.mu.Unlock()
		return fmt.Errorf("kiteq: start: %w", ErrClosed)
	case stateStarting, stateStarted:
		c.mu.Unlock()
		return errors.New("kiteq: start: already started")
	}
	topics, pub, err := c.checkConfig()
	if err != nil {
		c.mu.Unlock()
		return err
	}
	uri, err := registry.ParseURI(c.registryURI)
	if err != nil {
		c.mu.Unlock()
		return fmt.Errorf("kiteq: start: %w", err)
	}
	disc, err := newDiscovery(uri)
	if err != nil {
		c.mu.Unlock()
		return err
	}
	c.state = stateStarting
	c.discovery = disc
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.routes = make(map[string]*route, len(topics))
	for _, t := range topics {
		c.routes[t] = &route{topic: t}
	}
	c.pubTopics = pub
	if len(c.bindings) > 0 {
		c.bindingsMsg = &protocol.BindingsPacket{GroupId: new(c.groupId), Bindings: binding.ToProto(c.bindings)}
	}
	ctx, bindings := c.ctx, c.bindings
	c.mu.Unlock()

	if err := c.publish(ctx, disc, bindings); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("kiteq: start: %w", ErrClosed)
		}
		return err
	}
	if err := c.watch(ctx, disc, topics); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("kiteq: start: %w", ErrClosed)
		}
		return err
	}

	// Every broker has made its first attempt; only a refusal fails Start.
	c.mu.Lock()
	brokers := make([]*broker, 0, len(c.brokers))
	for _, b := range c.brokers {
		brokers = append(brokers, b)
	}
	c.mu.Unlock()
	var refused []error
	for _, b := range brokers {
		<-b.firstDone
		if errors.Is(b.firstErr, ErrAuth) || errors.Is(b.firstErr, ErrBindingsRefused) {
			refused = append(refused, b.firstErr)
		}
	}
	if len(refused) > 0 {
		return errors.Join(refused...)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return fmt.Errorf("kiteq: start: %w", ErrClosed)
	}
	c.state = stateStarted
	c.started.Store(true)
	return nil
}

// checkConfig validates topics and bindings and returns every topic the
// client needs brokers for, and the set it publishes. c.mu is held.
func (c *KiteQClient) checkConfig() ([]string, map[string]bool, error) {
	if c.groupId == "" {
		return nil, nil, errors.New("kiteq: start: empty groupId")
	}
	pub := make(map[string]bool, len(c.topics))
	var all []string
	for _, t := range c.topics {
		if t == "" {
			return nil, nil, errors.New("kiteq: start: empty topic in SetTopics")
		}
		if !pub[t] {
			pub[t] = true
			all = append(all, t)
		}
	}
	for _, b := range c.bindings {
		if b == nil {
			return nil, nil, errors.New("kiteq: start: nil binding")
		}
		if err := b.Validate(); err != nil {
			return nil, nil, fmt.Errorf("kiteq: start: %w", err)
		}
		if b.GroupId != c.groupId {
			return nil, nil, fmt.Errorf("kiteq: start: binding %s: groupId %q is not the client's %q", b, b.GroupId, c.groupId)
		}
		if !slices.Contains(all, b.Topic) {
			all = append(all, b.Topic)
		}
	}
	if len(all) == 0 {
		return nil, nil, errors.New("kiteq: start: no topics and no bindings: call SetTopics or SetBindings first")
	}
	return all, pub, nil
}

// publish announces the client in the registry (nothing to do for static).
func (c *KiteQClient) publish(ctx context.Context, disc registry.Discovery, bindings []*binding.Binding) error {
	host, _ := os.Hostname()
	for t := range c.pubTopics {
		if err := disc.PublishProducer(ctx, t, c.groupId, host); err != nil {
			return fmt.Errorf("kiteq: start: publish producer of %s: %w", t, err)
		}
	}
	if len(bindings) > 0 {
		if err := disc.PublishBindings(ctx, c.groupId, bindings); err != nil {
			return fmt.Errorf("kiteq: start: publish bindings: %w", err)
		}
	}
	return nil
}

// watch follows the brokers of every topic, and returns once each topic has
// its first list of brokers and each of those brokers its first connection
// attempt.
func (c *KiteQClient) watch(ctx context.Context, disc registry.Discovery, topics []string) error {
	type result struct {
		topic string
		err   error
	}
	results := make(chan result, len(topics))
	// Add under c.mu, as setBrokers does: either before Destroy's Wait or
	// not at all.
	c.mu.Lock()
	if c.state == stateClosed {
		c.mu.Unlock()
		return fmt.Errorf("kiteq: start: %w", ErrClosed)
	}
	c.wg.Add(len(topics))
	c.mu.Unlock()
	for _, t := range topics {
		go func() {
			defer c.wg.Done()
			var once sync.Once
			err := disc.WatchBrokers(ctx, t, func(addrs []string) {
				c.setBrokers(t, addrs)
				once.Do(func() { results <- result{t, nil} })
			})
			once.Do(func() {
				if err == nil {
					err = errors.New("registry returned no brokers")
				}
				results <- result{t, err}
			})
		}()
	}
	timer := time.NewTimer(c.timeout())
	defer timer.Stop()
	for range topics {
		select {
		case r := <-results:
			if r.err != nil {
				return fmt.Errorf("kiteq: start: watch brokers of %s: %w", r.topic, r.err)
			}
		case <-timer.C:
			return fmt.Errorf("kiteq: start: registry gave no brokers within %v: %w", c.timeout(), ErrTimeout)
		case <-ctx.Done():
			return fmt.Errorf("kiteq: start: %w", ErrClosed)
		}
	}
	return nil
}

// setBrokers makes addrs the brokers of topic: it starts a connection loop
// for each new address and stops those that no topic uses any more.
func (c *KiteQClient) setBrokers(topic string, addrs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.routes[topic]
	if r == nil || c.state == stateClosed {
		return
	}
	list := make([]*broker, 0, len(addrs))
	for _, a := range addrs {
		b := c.brokers[a]
		if b == nil {
			b = newBroker(c, a)
			c.brokers[a] = b
			c.wg.Add(1)
			go b.run()
		}
		if !slices.Contains(list, b) {
			list = append(list, b)
		}
	}
	r.brokers.Store(&list)
	for a, b := range c.brokers {
		used := false
		for _, r := range c.routes {
			if p := r.brokers.Load(); p != nil && slices.Contains(*p, b) {
				used = true
				break
			}
		}
		if !used {
			b.stop()
			delete(c.brokers, a)
		}
	}
	c.notifyReady() // senders re-check the new list
}

// Destroy closes the client: it stops reconnecting, closes the connections,
// fails waiting sends with ErrClosed, and returns once every goroutine the
// client started has ended, listener calls in progress included (so do not
// call it from a listener). It may be called more than once.
func (c *KiteQClient) Destroy() {
	c.mu.Lock()
	c.state = stateClosed
	cancel, disc := c.cancel, c.discovery
	c.mu.Unlock()
	c.started.Store(false)
	if cancel != nil {
		cancel()
	}
	if disc != nil {
		disc.Close()
	}
	c.wg.Wait()
}

// route is a topic and the brokers that serve it.
type route struct {
	topic   string
	brokers atomic.Pointer[[]*broker]
	next    atomic.Uint32 // round robin
}

// pick returns a ready connection of the topic's brokers, round robin, or
// nil.
func (r *route) pick() *conn {
	p := r.brokers.Load()
	if p == nil || len(*p) == 0 {
		return nil
	}
	bs := *p
	n := uint32(len(bs))
	start := r.next.Add(1)
	for i := range n {
		if cn := bs[(start+i)%n].cur.Load(); cn != nil && !cn.isClosed.Load() {
			return cn
		}
	}
	return nil
}

func (c *KiteQClient) readyChan() <-chan struct{} {
	c.readyMu.Lock()
	defer c.readyMu.Unlock()
	return c.readyCh
}

// notifyReady wakes every sender waiting for a connection.
func (c *KiteQClient) notifyReady() {
	c.readyMu.Lock()
	close(c.readyCh)
	c.readyCh = make(chan struct{})
	c.readyMu.Unlock()
}

var errDeadline = errors.New("deadline")

// waitConn returns a ready connection of r, waiting until deadline fires
// (errDeadline) or the client closes (ErrClosed).
func (c *KiteQClient) waitConn(r *route, deadline <-chan time.Time) (*conn, error) {
	for {
		if cn := r.pick(); cn != nil {
			return cn, nil
		}
		ready := c.readyChan()
		if cn := r.pick(); cn != nil {
			return cn, nil
		}
		select {
		case <-ready:
		case <-deadline:
			return nil, errDeadline
		case <-c.ctx.Done():
			return nil, ErrClosed
		}
	}
}
