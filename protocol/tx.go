package protocol

// TxResponse is what a producer's listener gets when the broker asks about
// an uncommitted message. The listener finds its local transaction from
// Header and decides with Commit or Rollback; anything else leaves the
// message undecided, and the broker asks again later.
type TxResponse struct {
	Header   *Header
	status   TxStatus
	Feedback string
}

// NewTxResponse returns an undecided response for the message with header h.
func NewTxResponse(h *Header) *TxResponse { return &TxResponse{Header: h} }

// Commit decides that the message is delivered.
func (t *TxResponse) Commit() { t.status = TxCommit }

// Rollback decides that the message is dropped.
func (t *TxResponse) Rollback() { t.status = TxRollback }

// Unknown leaves the message undecided, with a reason for the broker's log.
func (t *TxResponse) Unknown(feedback string) {
	t.status = TxUnknown
	t.Feedback = feedback
}

// Status returns the decision so far.
func (t *TxResponse) Status() TxStatus { return t.status }
